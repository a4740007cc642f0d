"""Quarantine rows are keyed (sample_id, content_digest, fingerprint) and written idempotently:
a re-run after a crash between the quarantine commit and the sources record re-reads those
items but adds no second row (filter rows included); an item whose failure changed gets its
row replaced. Listing errors of any type are quarantined with their reason, not fatal."""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.stages.base import InProcessExecutor, StageContext, StageError
from pipelines.stages.curate import CuratePanCap, CuratePanCapConfig
from tests.unit.test_source_incremental import Counting, bump_mtime
from vgen_core.data import TableStore
from vgen_core.formats.pancap_samples import write_pancap_sample_dataset

Q = "t/src__quarantine"


def run(store, cfg, *, budget=0.5, chunk=2):
    ctx = StageContext(dag="t", stage="src", store=store, row_fingerprint="fp",
                       error_budget=budget, chunk_size=chunk)
    return CuratePanCap(cfg, ctx).run(InProcessExecutor(batch_size=2))


@pytest.fixture
def broken_dataset(tmp_path):
    """4 PanCap samples; the first one's panoptic PNG is missing (a SampleError on read)."""
    root = write_pancap_sample_dataset(tmp_path / "raw", n_images=4, seed=0)
    png = sorted((root / "panoptic_train2017").glob("*.png"))[0]
    png.unlink()
    return root, png


def crash_once_in_record_items(monkeypatch):
    orig = CuratePanCap.record_items

    def boom(self, *args, **kwargs):
        monkeypatch.setattr(CuratePanCap, "record_items", orig)
        raise RuntimeError("killed between the quarantine commit and the sources record")

    monkeypatch.setattr(CuratePanCap, "record_items", boom)


def test_rerun_after_crash_adds_no_duplicate_quarantine_rows(tmp_path, broken_dataset,
                                                             monkeypatch):
    store = TableStore(str(tmp_path / "s"))
    # every readable sample is filtered (a filter:* row), the broken one quarantined
    cfg = CuratePanCapConfig(root=str(broken_dataset[0]), min_caption_words=10_000)
    crash_once_in_record_items(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        run(store, cfg)
    first = store.read(Q).to_pylist()
    assert len(first) == 2  # the first chunk's quarantine rows landed; its items unrecorded

    reads = Counting(monkeypatch, CuratePanCap, "_read")
    r = run(store, cfg)
    assert reads.take() == 4  # the crashed chunk's items are read again ...
    rows = store.read(Q).to_pylist()
    per_key = Counter((x["sample_id"], x["content_digest"], x["fingerprint"]) for x in rows)
    assert len(rows) == 4 and set(per_key.values()) == {1}  # ... but recorded once
    checks = Counter(x["check"] for x in rows)
    assert checks["filter:min_caption_words"] == 3 and sum(checks.values()) == 4
    # the two rows the crashed attempt wrote count as skipped, the other two as new
    assert r.counts.skipped == 2 and r.counts.quarantined + r.counts.filtered == 2

    v = store.version(Q)
    r = run(store, cfg)  # nothing changed: nothing read, nothing written
    assert (reads.take(), r.counts.skipped, store.version(Q)) == (0, 4, v)


def test_changed_failure_replaces_the_row(tmp_path, broken_dataset):
    root, png = broken_dataset
    store = TableStore(str(tmp_path / "s"))
    cfg = CuratePanCapConfig(root=str(root))
    r = run(store, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (3, 1)
    [before] = store.read(Q).to_pylist()

    png.write_bytes(b"not a png")  # still broken, differently
    bump_mtime(png)
    r = run(store, cfg)
    assert r.counts.quarantined == 1
    [after] = store.read(Q).to_pylist()
    assert after["sample_id"] == before["sample_id"]
    assert after["reason"] != before["reason"]


def test_listing_exception_of_any_type_is_quarantined(tmp_path, monkeypatch):
    root = write_pancap_sample_dataset(tmp_path / "raw", n_images=2, seed=0)

    def broken_listing(self, root):
        raise OSError("caption archive unreadable: input/output error")

    monkeypatch.setattr(CuratePanCap, "_list", broken_listing)
    store = TableStore(str(tmp_path / "s"))
    r = run(store, CuratePanCapConfig(root=str(root)), budget=1.0)
    assert (r.counts.processed, r.counts.quarantined) == (0, 1)
    [q] = store.read(Q).to_pylist()
    assert q["sample_id"] == "pancap/_listing" and q["check"] == "listing"
    assert "OSError" in q["reason"] and "input/output error" in q["reason"]
    assert str(root) in q["reason"]

    # over the budget, the stage's error says what failed without opening the table
    store2 = TableStore(str(tmp_path / "s2"))
    with pytest.raises(StageError, match=r"First: pancap/_listing \(listing\): .*OSError"):
        run(store2, CuratePanCapConfig(root=str(root)), budget=0.0)


def test_one_unusable_listed_item_is_quarantined_the_rest_go_on(tmp_path, monkeypatch):
    root = write_pancap_sample_dataset(tmp_path / "raw", n_images=3, seed=0)
    orig = CuratePanCap._list

    def listing_with_bad_items(self, root):
        items = orig(self, root)
        # no sample id; and a record json cannot serialise (mixed key types with sort_keys)
        return items + [{"image_id": 7}, {"sample_id": "pancap/odd", "annotation": {1: 2, "a": 3}}]

    monkeypatch.setattr(CuratePanCap, "_list", listing_with_bad_items)
    store = TableStore(str(tmp_path / "s"))
    r = run(store, CuratePanCapConfig(root=str(root)), budget=1.0)
    assert (r.counts.processed, r.counts.quarantined) == (3, 2)
    q = {x["sample_id"]: x for x in store.read(Q).to_pylist()}
    assert set(q) == {"pancap/_listing-3", "pancap/odd"}
    assert all(x["check"] == "listing" for x in q.values())
    assert "item 3" in q["pancap/_listing-3"]["reason"]
    assert "no string 'sample_id'" in q["pancap/_listing-3"]["reason"]
    assert "TypeError" in q["pancap/odd"]["reason"]


def test_missing_root_stays_a_clear_error(tmp_path):
    store = TableStore(str(tmp_path / "s"))
    with pytest.raises(StageError, match="with.root: .*nowhere.* does not exist"):
        run(store, CuratePanCapConfig(root=str(tmp_path / "nowhere")))
    assert not store.exists(Q) or store.read(Q).num_rows == 0
