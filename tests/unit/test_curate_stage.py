"""Curation stages in-process: filters are recorded (not dropped, not against the budget),
statistics and near-duplicates are reported, unchanged samples are not rewritten."""

from __future__ import annotations


import pytest

from pipelines.stages.base import InProcessExecutor, StageContext
from pipelines.stages.curate import CuratePanCap, CuratePanCapConfig
from vgen_core.data import TableStore
from vgen_core.formats.pancap_samples import write_pancap_sample_dataset


def run(store, cfg, fp="fp"):
    ctx = StageContext(dag="t", stage="pc", store=store, row_fingerprint=fp, error_budget=0.0)
    stage = CuratePanCap(cfg, ctx)
    return stage.run(InProcessExecutor(batch_size=4)), stage


@pytest.fixture
def dataset(tmp_path):
    return write_pancap_sample_dataset(tmp_path / "raw", n_images=4, seed=0)


def test_filters_are_recorded_not_failures(tmp_path, dataset):
    store = TableStore(str(tmp_path / "s"))
    r, _ = run(store, CuratePanCapConfig(root=str(dataset), min_caption_words=10_000))
    assert (r.counts.processed, r.counts.quarantined, r.counts.filtered) == (0, 0, 4)
    q = store.read("t/pc__quarantine").to_pylist()
    assert {x["check"] for x in q} == {"filter:min_caption_words"}
    assert all("< 10000" in x["reason"] for x in q)


def test_stats_near_duplicates_and_unchanged_rows(tmp_path, dataset):
    store = TableStore(str(tmp_path / "s"))
    r, stage = run(store, CuratePanCapConfig(root=str(dataset)))
    assert r.counts.processed == 4
    assert r.metrics["dataset/samples"] == 4
    assert r.metrics["dataset/near_duplicate_pairs"] == 0
    rows = store.read("t/pc").to_pylist()
    assert r.metrics["dataset/num_segments_mean"] == pytest.approx(
        sum(x["num_segments"] for x in rows) / 4)
    assert all(isinstance(x["phash"], int) for x in rows)

    # re-run over the same files: every sample read again, none rewritten
    v = store.version("t/pc")
    r, _ = run(store, CuratePanCapConfig(root=str(dataset)))
    assert (r.counts.processed, r.counts.skipped) == (0, 4)
    assert store.version("t/pc") == v


def test_missing_root_is_a_clear_error(tmp_path):
    store = TableStore(str(tmp_path / "s"))
    with pytest.raises(Exception) as e:
        run(store, CuratePanCapConfig(root=str(tmp_path / "nowhere")))
    assert "nowhere" in str(e.value)
