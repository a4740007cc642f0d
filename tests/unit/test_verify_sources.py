"""Source change detection by content on request.

By default a source stage trusts each file's size and mtime: a file rewritten with the same size
and the same mtime (a backup restore, ``rsync -t``) is skipped. That is the documented price of
not reading unchanged files. ``verify_sources`` (``vgen run --verify-sources``, or
``verify_sources: true`` on the stage) reads every listed file and writes exactly the samples whose
content digest changed, and only those; ``vgen plan`` names the mode that decides."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from pipelines.dag.spec import DagError, parse_dag
from pipelines.stages.base import InProcessExecutor, StageContext
from pipelines.stages.curate import CuratePanCap, CuratePanCapConfig
from pipelines.stages.ingest import IngestImages, IngestImagesConfig
from vgen_core.data import TableStore
from vgen_core.formats.pancap_samples import write_pancap_sample_dataset

CROPS = 2


class Loads:
    """Counts the source files a stage opens (``IngestImages._read``)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        orig = IngestImages._read

        def load(stage, path):
            self.paths.append(os.path.basename(path))
            return orig(stage, path)

        monkeypatch.setattr(IngestImages, "_read", load)

    def take(self) -> list[str]:
        out, self.paths = sorted(self.paths), []
        return out


def write_bmp(path, seed):
    """An uncompressed 24x24 image: every rewrite has the same size in bytes."""
    rgb = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="BMP")


def rewrite_keeping_size_and_mtime(path, seed):
    """New pixels, same byte size, the old mtime restored (what a restore / rsync -t leaves)."""
    st = os.stat(path)
    write_bmp(path, seed)
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        write_bmp(root / f"img{i}.bmp", seed=i)
    return root


def run(store, cfg, *, verify=False, cls=IngestImages):
    ctx = StageContext(dag="t", stage="src", store=store, row_fingerprint="fp",
                       error_budget=0.5, verify_sources=verify)
    return cls(cfg, ctx).run(InProcessExecutor(batch_size=2))


def digests(store) -> dict[str, str]:
    return {r["sample_id"]: r["content_digest"]
            for r in store.read("t/src", columns=["sample_id", "content_digest"]).to_pylist()}


def test_same_size_and_mtime_rewrite_is_found_only_by_verify(tmp_path, images, monkeypatch):
    loads = Loads(monkeypatch)
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(images), crops_per_image=CROPS, size=16)
    n = 5 * CROPS
    r = run(store, cfg)
    assert (r.counts.processed, len(loads.take())) == (n, 5)
    before, v0 = digests(store), store.version("t/src")

    rewrite_keeping_size_and_mtime(images / "img3.bmp", seed=99)

    # default (documented): size + mtime unchanged, so the file is not even opened
    r = run(store, cfg)
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (0, n, [])
    assert digests(store) == before and store.version("t/src") == v0

    # verify: every file is read; exactly img3's samples are written, in one commit
    sources_v = store.version("t/src__sources")
    r = run(store, cfg, verify=True)
    assert loads.take() == [f"img{i}.bmp" for i in range(5)]
    assert (r.counts.processed, r.counts.skipped, r.counts.quarantined) == (CROPS, n - CROPS, 0)
    after = digests(store)
    changed = sorted(s for s in after if after[s] != before[s])
    assert changed == [f"images/img3.bmp-c{k}" for k in range(CROPS)]
    assert set(after) == set(before)
    assert store.version("t/src") == v0 + 1
    assert store.version("t/src__sources") == sources_v  # records still true: none rewritten

    # verify again with nothing changed: everything read, nothing written
    v1 = store.version("t/src")
    r = run(store, cfg, verify=True)
    assert (r.counts.processed, r.counts.skipped, len(loads.take())) == (0, n, 5)
    assert store.version("t/src") == v1

    # back to the default: nothing read, the verified content stays
    r = run(store, cfg)
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (0, n, [])
    assert digests(store) == after


def test_verify_also_does_what_a_default_run_does(tmp_path, images, monkeypatch):
    """New, deleted and touched files are handled as in a default run; a broken file is
    quarantined once, not again on every verify."""
    loads = Loads(monkeypatch)
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(images), crops_per_image=1, size=16, labels="none")
    (images / "broken.bmp").write_bytes(b"BM not really")
    r = run(store, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (5, 1)
    loads.take()

    write_bmp(images / "img9.bmp", seed=9)
    os.remove(images / "img0.bmp")
    r = run(store, cfg, verify=True)
    assert len(loads.take()) == 6  # 4 old + 1 new + the broken one
    assert (r.counts.processed, r.counts.quarantined) == (1, 0)  # only the new file's sample
    assert sorted(digests(store)) == [f"images/img{i}.bmp-c0" for i in (1, 2, 3, 4, 9)]
    assert store.read("t/src__quarantine").num_rows == 1


def test_verify_finds_a_same_length_caption_edit(tmp_path, monkeypatch):
    root = write_pancap_sample_dataset(tmp_path / "raw", n_images=3, seed=0)
    store = TableStore(str(tmp_path / "s"))
    cfg = CuratePanCapConfig(root=str(root))
    assert run(store, cfg, cls=CuratePanCap).counts.processed == 3
    before = digests(store)

    cap = sorted((root / "caption_train2017").glob("*.txt"))[1]
    st = os.stat(cap)
    text = cap.read_text()
    cap.write_text(text[:-1] + ("X" if text[-1] != "X" else "Y"))  # same length
    os.utime(cap, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert run(store, cfg, cls=CuratePanCap).counts.processed == 0  # size+mtime: not seen
    r = run(store, cfg, cls=CuratePanCap, verify=True)
    assert (r.counts.processed, r.counts.skipped) == (1, 2)
    after = digests(store)
    assert [s for s in after if after[s] != before[s]] == [f"pancap/{cap.stem}"]


# ----------------------------------------------------------------------------- the DAG and CLI


def write_dag(tmp_path, images, **stage_keys):
    p = tmp_path / "dag.yaml"
    p.write_text(yaml.safe_dump({"name": "ver", "stages": {"images": {
        "uses": "ingest.images", "with": {"root": str(images), "crops_per_image": CROPS,
                                          "size": 16}, **stage_keys}}}))
    return p


def vgen(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def stage_counts(capsys, dag, storage) -> dict:
    code, out = vgen(capsys, "status", str(dag), "--storage", storage, "--json")
    assert code == 0, out
    return json.loads(out[:out.rindex("}") + 1])["stages"][0]["counts"]


def test_cli_verify_sources_and_plan_names_the_mode(tmp_path, images, capsys):
    dag, storage = write_dag(tmp_path, images), str(tmp_path / "s")
    code, out = vgen(capsys, "run", str(dag), "--storage", storage, "--local")
    assert code == 0, out
    store = TableStore(storage)
    before = digests_of(store)
    rewrite_keeping_size_and_mtime(images / "img1.bmp", seed=42)

    code, out = vgen(capsys, "plan", str(dag), "--storage", storage)
    assert code == 0 and "up-to-date" in out and "sources: size+mtime" in out, out
    code, out = vgen(capsys, "plan", str(dag), "--storage", storage, "--verify-sources")
    assert code == 0 and "to-run" in out and "sources: content (verify)" in out, out
    assert "every file is read" in out
    code, out = vgen(capsys, "plan", str(dag), "--storage", storage, "--verify-sources",
                     "--format", "json")
    [st] = json.loads(out)["stages"]
    assert (st["state"], st["sources"]) == ("to-run", "content (verify)")

    code, out = vgen(capsys, "run", str(dag), "--storage", storage, "--local")
    assert code == 0 and "up-to-date: skipped" in out, out  # the documented blind spot
    assert digests_of(store) == before

    code, out = vgen(capsys, "run", str(dag), "--storage", storage, "--local",
                     "--verify-sources")
    assert code == 0 and "[sources: content (verify)]" in out, out
    assert stage_counts(capsys, dag, storage) == {"processed": CROPS, "skipped": 4 * CROPS,
                                                  "quarantined": 0, "filtered": 0}
    after = digests_of(store)
    assert sorted(s for s in after if after[s] != before[s]) == [
        f"images/img1.bmp-c{k}" for k in range(CROPS)]

    code, out = vgen(capsys, "plan", str(dag), "--storage", storage)
    assert code == 0 and "up-to-date" in out, out  # verifying changed no fingerprint


def digests_of(store) -> dict[str, str]:
    return {r["sample_id"]: r["content_digest"] for r in store.read(
        "ver/images", columns=["sample_id", "content_digest"]).to_pylist()}


def test_stage_level_key(tmp_path, images, capsys):
    dag, storage = write_dag(tmp_path, images, verify_sources=True), str(tmp_path / "s")
    code, out = vgen(capsys, "plan", str(dag), "--storage", storage)
    assert code == 0 and "sources: content (verify)" in out, out

    with pytest.raises(DagError) as e:
        parse_dag({"name": "x", "stages": {
            "images": {"uses": "ingest.images"},
            "tokens": {"uses": "tokenize.lfq", "needs": ["images"], "verify_sources": True}}},
            "x.yaml")
    assert (e.value.stage, e.value.field) == ("tokens", "verify_sources")
    assert "ingest.images" in str(e.value) and "remove the key" in str(e.value)
    with pytest.raises(DagError) as e:
        parse_dag({"name": "x", "stages": {"images": {"uses": "ingest.images",
                                                      "verify_sources": "sometimes"}}}, "x.yaml")
    assert e.value.field == "verify_sources"
