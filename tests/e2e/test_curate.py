"""Curation stages on a real local Ray cluster: the sample datasets curate cleanly; the corrupt
corpora are quarantined case by case with the expected check, and the valid samples next to them
are curated unchanged."""

from __future__ import annotations

import os
import subprocess

import yaml

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore, make_sample_id


def run_dag(tmp, name: str, stages: dict, storage, env, budget: float = 1.0):
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "error_budget": budget, "stages": stages}))
    r = subprocess.run(vgen_cmd() + ["run", str(p), "--storage", str(storage)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    if r.returncode:
        print(r.stdout[-4000:], r.stderr[-8000:])
    return r


def test_pancap_clean_and_corrupt(ray_cluster, tmp_path):
    from vgen_core.formats.pancap_samples import (
        CORRUPT_CASES, CORRUPT_VALID_IDS, write_pancap_corrupt_corpus,
        write_pancap_sample_dataset)

    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    clean = write_pancap_sample_dataset(tmp_path / "clean", n_images=6, seed=0)
    corpus = tmp_path / "corrupt"
    expected = write_pancap_corrupt_corpus(corpus)
    storage = tmp_path / "store"
    stages = {
        "clean": {"uses": "curate.pancap", "with": {"root": str(clean)}},
        "corrupt": {"uses": "curate.pancap", "with": {"root": str(corpus / "samples")}},
    }
    assert run_dag(tmp_path, "pc", stages, storage, env).returncode == 0
    store = TableStore(str(storage))
    clean_rows = {r["sample_id"]: r for r in store.read("pc/clean").to_pylist()}
    assert len(clean_rows) == 6
    assert store.read("pc/clean__quarantine").num_rows == 0

    valid = {make_sample_id("pancap", i, width=12) for i in CORRUPT_VALID_IDS}
    out = {r["sample_id"]: r for r in store.read("pc/corrupt").to_pylist()}
    assert set(out) == valid
    for sid in valid:  # curated unchanged next to the broken ones
        assert out[sid]["content_digest"] == clean_rows[sid]["content_digest"]
    q = {r["sample_id"]: r for r in store.read("pc/corrupt__quarantine").to_pylist()}
    for case, (folder, image_id) in CORRUPT_CASES.items():
        if folder != "samples":
            continue
        sid = make_sample_id("pancap", image_id, width=12)
        assert sid in q, case
        assert q[sid]["check"] == expected[case], (case, q[sid]["reason"])
        assert q[sid]["reason"]

    # a truncated split JSON: the listing itself is quarantined with its reason; with the
    # default budget the stage fails (exit 1) and says so
    r = run_dag(tmp_path, "tj", {"tj": {"uses": "curate.pancap",
                                        "with": {"root": str(corpus / "truncated_json")}}},
                storage, env, budget=0.01)
    assert r.returncode == 1
    (row,) = store.read("tj/tj__quarantine").to_pylist()
    assert row["check"] == expected["truncated_json"]
    assert "error_budget" in r.stdout + r.stderr


def test_vicas_clean_and_corrupt(ray_cluster, tmp_path):
    from vgen_core.formats.vicas import vicas_sample_id
    from vgen_core.formats.vicas_samples import (
        CORRUPT_CASE_IDS, write_vicas_corrupt_corpus, write_vicas_sample_dataset)

    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    clean = tmp_path / "clean"
    write_vicas_sample_dataset(clean, n_videos=2, seed=0)
    corpus = tmp_path / "corrupt"
    expected = write_vicas_corrupt_corpus(corpus, n_valid=2, seed=0)
    storage = tmp_path / "store"
    stages = {
        "clean": {"uses": "curate.vicas", "with": {"root": str(clean), "version": "v1.0"}},
        "corrupt": {"uses": "curate.vicas", "with": {"root": str(corpus), "version": "v1.0"}},
        # through the split file: ids listed there without an annotation are quarantined too
        "corrupt_train": {"uses": "curate.vicas",
                          "with": {"root": str(corpus), "version": "v1.0", "split": "train"}},
    }
    assert run_dag(tmp_path, "vc", stages, storage, env).returncode == 0
    store = TableStore(str(storage))
    clean_rows = {r["sample_id"]: r for r in store.read("vc/clean").to_pylist()}
    assert len(clean_rows) == 2
    assert store.read("vc/clean__quarantine").num_rows == 0
    out = {r["sample_id"]: r for r in store.read("vc/corrupt").to_pylist()}
    assert set(out) == set(clean_rows)
    for sid, row in out.items():
        assert row["content_digest"] == clean_rows[sid]["content_digest"]
    q = {r["sample_id"]: r for r in store.read("vc/corrupt__quarantine").to_pylist()}
    q_train = {r["sample_id"]: r for r in store.read("vc/corrupt_train__quarantine").to_pylist()}
    assert set(q) == {vicas_sample_id(v) for c, v in CORRUPT_CASE_IDS.items()
                      if c != "annotation_missing"}
    assert set(q_train) == {vicas_sample_id(v) for v in CORRUPT_CASE_IDS.values()}
    for case, vid in CORRUPT_CASE_IDS.items():
        sid = vicas_sample_id(vid)
        assert q_train[sid]["check"] == expected[case], (case, q_train[sid]["reason"])
        if sid in q:
            assert q[sid]["check"] == expected[case], (case, q[sid]["reason"])
