"""evaluate.generation for a world model (DeltaWorld): best-of-N prediction error of held-out
delta tokens, computed in-process and checked against the sampler called directly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from vgen_core.data import TableStore
from vgen_core.data.schemas import DELTA_TOKENS


def _world(tmp_path, steps=(5, 4, 1)):
    """A delta-token side table (one row per video, fingerprint 'fp-d') and its curated keys,
    plus a seeded tiny DeltaWorld export."""
    from pipelines.stages.base import OutputRef
    from vgen_core.generators.deltaworld import deltaworld_config
    from vgen_core.tokenizers.io import save_pretrained, weights_digest

    store = TableStore(str(tmp_path / "store"))
    torch.manual_seed(0)
    model = deltaworld_config("tiny").build()
    D = model.config.token_dim
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(steps):
        rows.append({"sample_id": f"vicas/{i:06d}", "content_digest": f"d{i}",
                     "fingerprint": "fp-d", "caption": None, "num_steps": n, "dim": D,
                     "frame_indices": list(range(n + 1)),
                     "timestamps": [k / 10 for k in range(n + 1)],
                     "delta": rng.normal(size=n * D).astype(np.float32).tolist()})
    # a row of another fingerprint and a row of a sample no longer curated: never scored
    rows.append({**rows[0], "fingerprint": "fp-other"})
    rows.append({**rows[1], "sample_id": "vicas/999999", "content_digest": "gone"})
    store.append("t/deltas/fp", pa.Table.from_pylist(rows, schema=DELTA_TOKENS))
    keys = pa.table({"sample_id": [r["sample_id"] for r in rows[:3]],
                     "content_digest": [r["content_digest"] for r in rows[:3]]})
    store.append("t/vicas", keys)
    save_pretrained(model, tmp_path / "gen")
    side = OutputRef("table", "t/deltas/fp", store.uri("t/deltas/fp"),
                     version=store.version("t/deltas/fp"), digest="fp-d")
    source = OutputRef("table", "t/vicas", store.uri("t/vicas"), version=store.version("t/vicas"))
    gen = OutputRef("model", "gen", str(tmp_path / "gen"), digest=weights_digest(model))
    return store, {"world": {"generator": gen}, "deltas": {"samples": side, "source": source}}, rows


def _stage(store, inputs, **cfg):
    from pipelines.stages.base import StageContext
    from pipelines.stages.evaluate_generation import EvaluateGeneration, EvaluateGenerationConfig

    ctx = StageContext(dag="t", stage="eval", store=store, row_fingerprint="fp-eval",
                       inputs=inputs)
    return EvaluateGeneration(EvaluateGenerationConfig(**cfg), ctx)


def test_best_of_n_error_equals_the_sampler_called_directly(tmp_path, one_thread):
    from vgen_core.generators.deltaworld import sample
    from vgen_core.tokenizers.io import load_pretrained

    store, inputs, rows = _world(tmp_path)
    r = _stage(store, inputs, num_samples=10, seed=3, sampler={"num_samples": 5}).run()
    # expected: videos with more than `horizon` tokens, sorted by id, video i seeded 3 + i
    model = load_pretrained(tmp_path / "gen")
    best, mean, copy = [], [], []
    for i, row in enumerate(rows[:2]):  # the third video has 1 token: nothing to predict from
        n, D = row["num_steps"], row["dim"]
        d = torch.tensor(np.asarray(row["delta"], np.float32).reshape(n, D))
        t = torch.tensor(np.asarray(row["timestamps"], np.float32)[1:])
        g = torch.Generator().manual_seed(3 + i)
        preds = sample(model, d[None, :-1], t[None], horizon=1, num_samples=5, generator=g)[0]
        mse = ((preds - d[-1:][None]) ** 2).mean(dim=(1, 2))
        best.append(float(mse.min()))
        mean.append(float(mse.mean()))
        copy.append(float(((d[-2] - d[-1]) ** 2).mean()))
    assert r.metrics["delta/best_of_n_mse"] == pytest.approx(np.mean(best), rel=1e-6)
    assert r.metrics["delta/mean_mse"] == pytest.approx(np.mean(mean), rel=1e-6)
    assert r.metrics["delta/copy_last_mse"] == pytest.approx(np.mean(copy), rel=1e-6)
    assert r.metrics["delta/best_of_n_vs_copy"] == pytest.approx(np.mean(best) / np.mean(copy),
                                                                 rel=1e-6)
    assert r.metrics["delta/best_of_n_mse"] <= r.metrics["delta/mean_mse"]
    rows_out = store.read("t/eval").to_pylist()
    assert {x["num_samples"] for x in rows_out} == {2}
    details = json.loads(rows_out[0]["details"])
    assert details["reference"]["horizon"] == 1
    assert details["lineage"]["tokens"]["fingerprint"] == "fp-d"


def test_horizon_longer_than_every_video_is_refused(tmp_path):
    from pipelines.stages.base import StageError

    store, inputs, _ = _world(tmp_path, steps=(2, 2, 1))
    with pytest.raises(StageError, match="more than horizon=3"):
        _stage(store, inputs, sampler={"horizon": 3}).run()
    with pytest.raises(StageError, match="does not take"):
        _stage(store, inputs, sampler={"steps": 4}).run()
