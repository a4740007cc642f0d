"""A tokenize stage outputs the model it encoded with; the reference is implied by the side
table's fingerprint, so it stays out of downstream fingerprints, and a record written before it
existed re-runs only the tokenize stage (every row skipped) to record it."""

from __future__ import annotations

import re

import pytest
import torch

from vgen_core.data import TableStore


def _dag(**tokens_with):
    from pipelines.dag.spec import parse_dag

    return parse_dag({"name": "t", "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 1, "size": 32}},
        "tokens": {"uses": "tokenize.titok", "needs": ["images"],
                   "with": {"size": "tiny", "flip": False, **tokens_with}},
        "tokens2": {"uses": "tokenize.titok", "needs": ["images"],
                    "with": {"size": "tiny", "flip": False, "init_seed": 1}}}})


def _run(dag, store):
    from pipelines.dag.runner import Runner
    from vgen_core.tracking import NullTracker

    summary = Runner(dag, store, NullTracker(), "", executor="local").run()
    assert summary.ok, {n: o.error for n, o in summary.outcomes.items()}
    return summary


def test_seeded_tokenizer_is_exported_once_and_loads_to_the_encoder(tmp_path, one_thread):
    from pipelines.dag.state import StageState
    from vgen_core import families
    from vgen_core.tokenizers.io import load_pretrained, weights_digest

    store = TableStore(str(tmp_path / "store"))
    summary = _run(_dag(), store)
    out = summary.outcomes["tokens"].outputs
    ref = out["tokenizer"]
    assert ref.kind == "model" and ref.uri == store.path(f"models/t/tokens/{out['samples'].digest}")
    torch.manual_seed(0)
    seeded = families.get("titok").build("tiny").eval()
    model = load_pretrained(ref.uri)
    assert weights_digest(model) == weights_digest(seeded) == ref.digest
    # another seed: another row fingerprint, another export
    other = summary.outcomes["tokens2"].outputs["tokenizer"]
    assert other.uri != ref.uri and other.digest != ref.digest
    # the stage's rows are those the exported model encodes
    from vgen_core.data.images import decode_image, preprocess
    from vgen_core.families import to_model_pixels

    rows = store.read(out["samples"].name).to_pylist()
    images = store.read(out["source"].name).to_pylist()
    by_id = {r["sample_id"]: r["image_png"] for r in images}
    x = torch.from_numpy(preprocess(decode_image(by_id[rows[0]["sample_id"]]), 32).copy())[None]
    with torch.inference_mode():
        ids = families.get("titok").encode(model, to_model_pixels(x, "unit"))["indices"]
    assert ids[0].tolist() == rows[0]["indices"]
    # recorded: a re-run skips everything, the export is not rewritten
    mtime = (tmp_path / "store" / f"models/t/tokens/{out['samples'].digest}"
             / "config.json").stat().st_mtime_ns
    again = _run(_dag(), store)
    assert {o.action for o in again.outcomes.values()} == {"skipped"}
    assert again.outcomes["tokens"].outputs["tokenizer"] == ref
    _, done = StageState(store).latest("t")
    assert done["tokens"]["outputs"]["tokenizer"]["digest"] == ref.digest
    assert (tmp_path / "store" / f"models/t/tokens/{out['samples'].digest}"
            / "config.json").stat().st_mtime_ns == mtime


def test_tokenizer_output_stays_out_of_downstream_fingerprints(tmp_path, one_thread):
    """A record from before the tokenizer output existed: the tokenize stage re-runs (all rows
    skipped) to record it, and a downstream stage's fingerprint is the same either way."""
    from pipelines.dag.planner import plan_dag
    from pipelines.dag.spec import parse_dag
    from pipelines.dag.state import StageState

    store = TableStore(str(tmp_path / "store"))
    dag = parse_dag({"name": "t", "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 1, "size": 32}},
        "tokens": {"uses": "tokenize.titok", "needs": ["images"],
                   "with": {"size": "tiny", "flip": False}},
        "eval": {"uses": "evaluate.tokenizer", "needs": ["tokens"],
                 "with": {"num_samples": 0}}}})
    first = _run(dag, store)
    plans = {p.stage: p for p in plan_dag(dag, store, StageState(store))}
    assert all(p.state == "up-to-date" for p in plans.values())
    eval_fp = plans["eval"].fingerprint
    assert "tokenizer" not in plans["eval"].parts["upstream"]["tokens"]["outputs"]
    # rewrite the tokenize record as an older vgen wrote it: no tokenizer output
    state = StageState(store)
    _, done = state.latest("t")
    rec = done["tokens"]
    state.record(dag="t", stage="tokens", kind=rec["kind"], fingerprint=rec["fingerprint"],
                 parts=rec["fingerprint_parts"], status="completed",
                 outputs={k: v for k, v in rec["outputs"].items() if k != "tokenizer"},
                 counts=rec["counts"])
    plans = {p.stage: p for p in plan_dag(dag, store, StageState(store))}
    assert plans["tokens"].state == "to-run" and "no 'tokenizer' output" in plans["tokens"].reason
    again = _run(dag, store)
    assert again.outcomes["tokens"].action == "ran"
    assert again.outcomes["tokens"].counts.processed == 0  # every row already there
    assert again.outcomes["eval"].action == "skipped"  # same fingerprint as before
    assert again.outcomes["tokens"].outputs["tokenizer"] == \
        first.outcomes["tokens"].outputs["tokenizer"]
    plans = {p.stage: p for p in plan_dag(dag, store, StageState(store))}
    assert plans["eval"].fingerprint == eval_fp


def test_a_model_that_fills_another_side_table_is_refused(tmp_path):
    from pipelines.stages.base import StageContext, StageError
    from pipelines.stages.cache_latents import CacheLatents
    from pipelines.stages.tokenize import ImageTokenizeConfig, TokenizeTiTok

    store = TableStore(str(tmp_path / "s"))
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp")
    st = TokenizeTiTok(ImageTokenizeConfig(size="tiny-vae"), ctx)
    with pytest.raises(StageError, match="makes latents .*quantize_mode=vae.*use cache.latents"):
        st.setup()
    st = CacheLatents(ImageTokenizeConfig(model="titok", size="tiny"), ctx)
    with pytest.raises(StageError, match="makes id_tokens.*use tokenize.titok"):
        st.setup()
    st = TokenizeTiTok(ImageTokenizeConfig(model="kl_vae"), ctx)
    with pytest.raises(StageError, match=re.escape(
            "takes model maskgit-vqgan | tatitok | titok, got 'kl_vae'")):
        st.setup()
    assert CacheLatents.accepted_families() == ["kl_vae", "tatitok", "titok"]
