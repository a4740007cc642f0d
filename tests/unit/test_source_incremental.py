"""Source stages (ingest.images, curate.pancap, curate.vicas) are incremental per source item:
a re-run reads only the files that are new or changed (by listing stamp: size, mtime, label,
annotation record) and skips the rest without opening them; deleted files stop being served
and their records go; an item whose rows vanished from the table is read again."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.stages.base import InProcessExecutor, StageContext
from pipelines.stages.curate import (CuratePanCap, CuratePanCapConfig, CurateViCaS,
                                     CurateViCaSConfig)
from pipelines.stages.ingest import IngestImages, IngestImagesConfig
from vgen_core.data import TableStore
from vgen_core.formats.pancap_samples import write_pancap_sample_dataset
from vgen_core.formats.vicas_samples import write_vicas_sample_dataset


class Counting:
    """Counts calls of a stage method (how many source items were actually read)."""

    def __init__(self, monkeypatch, cls, name):
        self.calls: list = []
        orig = getattr(cls, name)

        def wrapped(stage, item, *a, **k):
            self.calls.append(item)
            return orig(stage, item, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)

    def take(self) -> int:
        n = len(self.calls)
        self.calls.clear()
        return n


def write_png(path, seed, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    bump_mtime(path)


def bump_mtime(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))


def run(store, stage_cls, cfg, fp="fp"):
    ctx = StageContext(dag="t", stage="src", store=store, row_fingerprint=fp, error_budget=0.5)
    return stage_cls(cfg, ctx).run(InProcessExecutor(batch_size=3))


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(8):
        write_png(root / f"class{i % 2}" / f"img{i}.png", seed=i)
    return root


def test_ingest_rereads_only_changed_files(tmp_path, image_folder, monkeypatch):
    loads = Counting(monkeypatch, IngestImages, "_read")
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(image_folder), crops_per_image=2, size=16)

    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (16, 0, 8)
    first = {x["sample_id"]: x for x in store.read("t/src").to_pylist()}
    assert len(first) == 16

    # no change: nothing opened, nothing written
    v = store.version("t/src")
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (0, 16, 0)
    assert store.version("t/src") == v

    # one file rewritten, one deleted: exactly that file is read; the deleted one's rows go
    write_png(image_folder / "class0" / "img2.png", seed=100)
    os.remove(image_folder / "class1" / "img5.png")
    r = run(store, IngestImages, cfg)
    assert [os.path.basename(p) for p in loads.calls] == ["img2.png"]
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (2, 12, 1)
    now = {x["sample_id"]: x for x in store.read("t/src").to_pylist()}
    assert set(now) == set(first) - {"images/class1%2Fimg5.png-c0", "images/class1%2Fimg5.png-c1"}
    for sid, row in now.items():
        same = row["content_digest"] == first[sid]["content_digest"]
        assert same == (not sid.startswith("images/class0%2Fimg2.png-")), sid
    recorded = store.read("t/src__sources")
    assert not any(k.endswith("img5.png") for k in recorded["item_key"].to_pylist())

    # the deleted file comes back (same bytes, new mtime): read again, served again
    write_png(image_folder / "class1" / "img5.png", seed=5)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, loads.take()) == (2, 1)
    assert {x["sample_id"] for x in store.read("t/src").to_pylist()} == set(first)

    # rows deleted behind the stage's back: that file is read again
    store.delete("t/src", "sample_id = 'images/class1%2Fimg3.png-c1'")
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, loads.take()) == (1, 1)

    # another config (row fingerprint): everything read again
    r = run(store, IngestImages, cfg.model_copy(update={"size": 8}), fp="fp2")
    assert (r.counts.processed, loads.take()) == (16, 8)


def test_ingest_label_shift_and_bad_file(tmp_path, monkeypatch):
    """A flat folder labels by listing index: a new first file relabels every other file, so they
    are all read again. An undecodable file is quarantined once, not on every re-run."""
    loads = Counting(monkeypatch, IngestImages, "_read")
    root = tmp_path / "flat"
    for i in range(1, 4):
        write_png(root / f"b{i}.png", seed=i)
    (root / "broken.png").write_bytes(b"not a png")
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(root), crops_per_image=1, size=16)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined, loads.take()) == (3, 1, 4)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined, loads.take()) == (0, 0, 0)
    assert store.read("t/src__quarantine").num_rows == 1

    write_png(root / "a0.png", seed=0)  # sorts first: b1..b3 and broken.png move up one
    r = run(store, IngestImages, cfg)
    assert loads.take() == 5
    labels = {x["sample_id"]: x["label"] for x in store.read("t/src").to_pylist()}
    assert labels == {"images/a0.png-c0": 0, "images/b1.png-c0": 1, "images/b2.png-c0": 2,
                      "images/b3.png-c0": 3}


def test_a_file_that_breaks_loses_its_rows_and_gets_them_back_when_repaired(tmp_path,
                                                                            image_folder):
    """Found by the soak test: a file that decoded and is now broken must not keep its old rows
    (a fresh run has none; downstream would go on with stale pixels). Its samples are
    quarantined and its rows deleted; repaired, it gets rows again."""
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(image_folder), crops_per_image=2, size=16)
    assert run(store, IngestImages, cfg).counts.processed == 16
    victim = image_folder / "class1" / "img3.png"
    victim.write_bytes(b"not an image any more")
    bump_mtime(victim)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (0, 2)
    ids = store.read("t/src")["sample_id"].to_pylist()
    assert len(ids) == 14 and not [i for i in ids if "img3" in i]
    assert run(store, IngestImages, cfg).counts.quarantined == 0  # recorded: not read again
    write_png(victim, seed=99)
    r = run(store, IngestImages, cfg)
    assert r.counts.processed == 2 and store.read("t/src").num_rows == 16


def test_a_read_error_keeps_the_rows_and_retries_the_file(tmp_path, image_folder, monkeypatch):
    """An I/O error (a throttled or flaky store) says nothing about a file's content: its rows
    stay, it is quarantined with check 'read', and the next run reads it again."""
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(image_folder), crops_per_image=2, size=16)
    run(store, IngestImages, cfg)
    victim = image_folder / "class0" / "img2.png"
    bump_mtime(victim)  # changed by stamp: re-read, and the read fails this time
    orig = IngestImages._read

    def flaky(stage, path):
        if path.endswith("img2.png"):
            raise OSError("SlowDown: please reduce your request rate")
        return orig(stage, path)

    monkeypatch.setattr(IngestImages, "_read", flaky)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (0, 2)
    q = store.read("t/src__quarantine").to_pylist()
    assert {x["check"] for x in q} == {"read"} and "SlowDown" in q[0]["reason"]
    assert store.read("t/src").num_rows == 16  # its rows were kept
    monkeypatch.setattr(IngestImages, "_read", orig)
    loads = Counting(monkeypatch, IngestImages, "_read")
    r = run(store, IngestImages, cfg)  # not recorded: read again, and it reads now
    assert loads.take() == 1 and store.read("t/src").num_rows == 16


def test_crash_after_data_commit_rereads_but_rewrites_nothing(tmp_path, image_folder,
                                                              monkeypatch):
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(image_folder), crops_per_image=1, size=16)
    orig = IngestImages.record_items

    def boom(self, *args, **kwargs):
        raise RuntimeError("killed between the data commit and its record")

    monkeypatch.setattr(IngestImages, "record_items", boom)
    with pytest.raises(RuntimeError, match="killed"):
        run(store, IngestImages, cfg)
    assert store.read("t/src").num_rows > 0  # the first chunk's rows landed
    monkeypatch.setattr(IngestImages, "record_items", orig)
    loads = Counting(monkeypatch, IngestImages, "_read")
    r = run(store, IngestImages, cfg)
    assert loads.take() == 8
    assert r.counts.processed + r.counts.skipped == 8 and r.counts.skipped >= 1
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.skipped, loads.take()) == (0, 8, 0)


def test_pancap_rereads_only_the_edited_caption(tmp_path, monkeypatch):
    root = write_pancap_sample_dataset(tmp_path / "raw", n_images=4, seed=0)
    reads = Counting(monkeypatch, CuratePanCap, "_read")
    store = TableStore(str(tmp_path / "s"))
    cfg = CuratePanCapConfig(root=str(root))
    r = run(store, CuratePanCap, cfg)
    assert (r.counts.processed, reads.take()) == (4, 4)
    r = run(store, CuratePanCap, cfg)
    assert (r.counts.processed, r.counts.skipped, reads.take()) == (0, 4, 0)

    cap = sorted((root / "caption_train2017").glob("*.txt"))[1]
    time.sleep(0.01)
    cap.write_text(cap.read_text() + " Edited.")
    bump_mtime(cap)
    r = run(store, CuratePanCap, cfg)
    assert (r.counts.processed, r.counts.skipped, reads.take()) == (1, 3, 1)
    edited = [x for x in store.read("t/src").to_pylist() if x["caption"].endswith("Edited.")]
    assert len(edited) == 1


def test_vicas_rereads_only_the_edited_video(tmp_path, monkeypatch):
    root = tmp_path / "vicas"
    write_vicas_sample_dataset(root, n_videos=3, seed=0)
    reads = Counting(monkeypatch, CurateViCaS, "_read")
    store = TableStore(str(tmp_path / "s"))
    cfg = CurateViCaSConfig(root=str(root), version="v1.0")
    r = run(store, CurateViCaS, cfg)
    assert (r.counts.processed, reads.take()) == (3, 3)
    r = run(store, CurateViCaS, cfg)
    assert (r.counts.processed, r.counts.skipped, reads.take()) == (0, 3, 0)

    # one frame of one video touched (same bytes): only that video is read again, and its
    # row, the same as before, is not rewritten
    frames = sorted((root / "video_frames").iterdir())[0]
    frame = sorted(frames.iterdir())[0]
    frame.write_bytes(frame.read_bytes())
    bump_mtime(frame)
    v = store.version("t/src")
    r = run(store, CurateViCaS, cfg)
    assert (r.counts.processed, r.counts.skipped, reads.take()) == (0, 3, 1)
    assert store.version("t/src") == v
