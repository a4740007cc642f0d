"""Incremental re-tokenization and crash safety on a two-stage DAG (ingest -> tokenize with a
seeded tokenizer): a changed image recomputes only its samples; a SIGKILLed run resumes and every
sample ends up in the output exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore
from vgen_core.data.sample_images import PHOTOS, export_photos


def C(processed: int, skipped: int = 0, quarantined: int = 0, filtered: int = 0) -> dict:
    return {"processed": processed, "skipped": skipped, "quarantined": quarantined,
            "filtered": filtered}
CROPS = 4
N = len(PHOTOS) * CROPS


def make_dag(tmp: Path, images: Path, chunk: int = 8) -> Path:
    dag = {
        "name": "inc", "chunk_size": chunk, "error_budget": 0.0,
        "stages": {
            "images": {"uses": "ingest.images",
                       "with": {"root": str(images), "crops_per_image": CROPS, "size": 32}},
            "tokens": {"uses": "tokenize.lfq", "needs": ["images"],
                       "with": {"resolution": 32, "flip": True},
                       "resources": {"batch_size": 4}},
        },
    }
    p = tmp / "inc.yaml"
    p.write_text(yaml.safe_dump(dag))
    return p


def run(dag: Path, storage: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + ["run", str(dag), "--storage", str(storage)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-5000:], p.stderr[-10000:])
    return p


def counts(dag: Path, storage: Path, env: dict) -> dict:
    p = subprocess.run(vgen_cmd() + ["status", str(dag), "--storage", str(storage), "--json"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return {s["stage"]: s for s in json.loads(p.stdout)["stages"]}


@pytest.fixture
def setup(ray_cluster, tmp_path):
    images = tmp_path / "images"
    export_photos(images)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    return make_dag(tmp_path, images), images, tmp_path / "store", env


def test_changed_image_recomputes_only_its_samples(setup):
    dag, images, storage, env = setup
    assert run(dag, storage, env).returncode == 0
    st = counts(dag, storage, env)
    assert st["tokens"]["counts"] == C(N)
    before = {r["sample_id"]: r["content_digest"]
              for r in TableStore(str(storage)).read("inc/images").to_pylist()}

    path = images / "coffee.png"
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)  # every crop changes
    p = run(dag, storage, env)
    assert p.returncode == 0
    st = counts(dag, storage, env)
    assert st["images"]["counts"] == C(CROPS, skipped=N - CROPS)
    assert st["tokens"]["counts"] == C(CROPS, skipped=N - CROPS)
    after = {r["sample_id"]: r["content_digest"]
             for r in TableStore(str(storage)).read("inc/images").to_pylist()}
    changed = sorted(s for s in after if after[s] != before[s])
    assert changed == [f"images/coffee.png-c{k}" for k in range(CROPS)]

    # the 4 old-digest token rows are unreachable now: `vgen gc` deletes exactly those
    g = subprocess.run(vgen_cmd() + ["gc", str(dag), "--storage", str(storage)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert g.returncode == 0, g.stderr
    assert f"deleted {CROPS} stale rows" in g.stdout
    (side,) = TableStore(str(storage)).list_tables("inc/tokens")  # one tokenizer fingerprint
    tokens = TableStore(str(storage)).read(side)
    assert tokens.num_rows == N and len(set(tokens["sample_id"].to_pylist())) == N


def test_undecodable_image_is_quarantined_within_budget(setup):
    dag, images, storage, env = setup
    (images / "broken.png").write_bytes(b"not a png at all")
    d = yaml.safe_load(dag.read_text())
    d["error_budget"] = 0.1
    dag.write_text(yaml.safe_dump(d))
    assert run(dag, storage, env).returncode == 0
    q = TableStore(str(storage)).read("inc/images__quarantine").to_pylist()
    assert sorted(r["sample_id"] for r in q) == [f"images/broken.png-c{k}" for k in range(CROPS)]
    assert all(r["check"] == "decode" and "broken.png" in r["reason"] for r in q)
    st = counts(dag, storage, env)
    assert st["images"]["counts"] == C(N, quarantined=CROPS)

    d["error_budget"] = 0.0  # same inputs, zero budget: the stage must fail, exit code 1
    dag.write_text(yaml.safe_dump(d))
    store2 = storage.parent / "store2"
    p = run(dag, store2, env)
    assert p.returncode == 1
    assert "error_budget" in p.stdout + p.stderr


def test_sigkill_mid_stage_then_resume_exactly_once(setup):
    dag, images, storage, env = setup
    proc = subprocess.Popen(vgen_cmd() + ["run", str(dag), "--storage", str(storage)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    side_dir = storage / "tables" / "inc" / "tokens"  # <fingerprint[:16]>/_delta_log inside
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        commits = sorted(side_dir.glob("*/_delta_log/*.json"))
        if len(commits) >= 2:  # created + at least one chunk committed
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = len(commits)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    store = TableStore(str(storage))
    (side,) = store.list_tables("inc/tokens")
    partial = store.read(side).num_rows
    assert 0 < partial < N, partial

    p = run(dag, storage, env)
    assert p.returncode == 0
    assert "[tokens] partial" in p.stderr
    rows = store.read(side)
    ids = rows["sample_id"].to_pylist()
    assert len(ids) == N and len(set(ids)) == N
    st = counts(dag, storage, env)
    assert st["tokens"]["counts"]["skipped"] == partial
    assert st["tokens"]["counts"]["processed"] == N - partial
