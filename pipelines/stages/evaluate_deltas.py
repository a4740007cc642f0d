"""``evaluate.generation`` for generators whose samples are delta tokens (a world model).

A family whose spec says ``output: delta_tokens`` (DeltaWorld) predicts the next delta tokens of a
video from the observed ones. Its evaluation is a prediction error on held-out futures, not an
image metric: for every current video of the delta-token side table (sorted by ``sample_id``, at
most ``num_samples``), the first ``T - horizon`` delta tokens are the context and the last
``horizon`` the target (``sampler.horizon``, default 1). The sampler draws N hypotheses
(``sampler.num_samples``, default the model's ``num_samples_eval``); per video:

* ``delta/best_of_n_mse``: min over hypotheses of the mean squared error over (horizon, D): the
  best-of-many error DeltaWorld trains for;
* ``delta/mean_mse``: the error averaged over hypotheses; ``delta/best_of_n_l1`` likewise in L1;
* ``delta/copy_last_mse``: the error of repeating the last context token (the trivial baseline),
  and ``delta/best_of_n_vs_copy`` = best_of_n_mse / copy_last_mse (below 1: better than copying;
  not reported when copying is exact, e.g. an untrained tokenizer whose tokens do not change).

Each is averaged over videos. Video ``i`` draws with seed ``seed + i``, so results do not depend on
how many actors ran. Delta tokens decode to vision-foundation-model features, not pixels (the
DeltaTok decoder), so no image metric is computed: the results say so in ``details.notes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vgen_core import families

from .base import OutputRef, StageError, StageResult, resolve_device

__all__ = ["evaluate_predictions"]

_COLUMNS = ["sample_id", "content_digest", "fingerprint", "delta", "num_steps", "dim",
            "timestamps"]


class _PredictActor:
    """Loads the generator once; a call scores a batch of videos (one seed each)."""

    def __init__(self, plan: dict[str, Any]):
        import tempfile

        from .evaluate_generation import load_model_ref

        self._tmp = tempfile.TemporaryDirectory()
        self.plan, self.device = plan, resolve_device(plan["device"])
        self.model = load_model_ref(plan["generator"], self._tmp.name).to(self.device)
        self.sample = families.get(self.model.family).hook("sampler")

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        horizon, out = self.plan["horizon"], []
        with torch.inference_mode():
            for r in batch.to_pylist():
                n, dim = int(r["num_steps"]), int(r["dim"])
                delta = torch.tensor(np.asarray(r["delta"], np.float32).reshape(n, dim))
                times = torch.tensor(np.asarray(r["timestamps"], np.float32)[1:n + 1])
                ctx, target = delta[: n - horizon], delta[n - horizon:]
                g = torch.Generator(device=self.device).manual_seed(
                    self.plan["seed"] + int(r["index"]))
                preds = self.sample(self.model, ctx[None].to(self.device),
                                    times[None].to(self.device), horizon=horizon,
                                    generator=g, **self.plan["sampler"])[0].float().cpu()
                err = (preds - target[None]) ** 2  # (N, horizon, D)
                mse_N = err.mean(dim=(1, 2))
                l1_N = (preds - target[None]).abs().mean(dim=(1, 2))
                copy = ((ctx[-1:].expand_as(target) - target) ** 2).mean()
                out.append({"sample_id": r["sample_id"], "best_mse": float(mse_N.min()),
                            "mean_mse": float(mse_N.mean()), "best_l1": float(l1_N.min()),
                            "copy_mse": float(copy), "hypotheses": int(preds.shape[0])})
        return pa.Table.from_pylist(out, schema=_RESULT)


#: below this mean squared error the copy-last baseline is exact and a ratio to it is noise
_COPY_FLOOR = 1e-10

_RESULT = pa.schema([("sample_id", pa.string()), ("best_mse", pa.float64()),
                     ("mean_mse", pa.float64()), ("best_l1", pa.float64()),
                     ("copy_mse", pa.float64()), ("hypotheses", pa.int64())])


def evaluate_predictions(stage: Any, executor: Any, spec: families.FamilySpec,
                         gen_ref: OutputRef, side: OutputRef, source: OutputRef,
                         facts: dict[str, Any]) -> StageResult:
    """Score a world model's predicted delta tokens (see the module docstring)."""
    from .base import filter_to_keys

    store, cfg, where = stage.ctx.store, stage.config, stage._where()
    sampler = dict(cfg.sampler)
    horizon = int(sampler.pop("horizon", 1))
    if horizon < 1:
        raise StageError(f"{where}: sampler.horizon must be >= 1, got {horizon}")
    t = store.read(side.name, version=side.version, columns=_COLUMNS)
    t = t.filter(pc.equal(t["fingerprint"], side.digest))
    keys = store.read(source.name, version=source.version, columns=["sample_id", "content_digest"])
    t = filter_to_keys(t, keys)
    t = t.filter(pc.greater(t["num_steps"], horizon)).sort_by("sample_id")
    if t.num_rows == 0:
        raise StageError(f"{where}: no video in {side.uri} has more than horizon={horizon} delta "
                         "tokens to predict; tokenize more frames (max_frames) or lower horizon")
    t = t.slice(0, cfg.num_samples)
    t = t.append_column("index", pa.array(np.arange(t.num_rows), pa.int64()))
    plan = {"generator": gen_ref.to_json(), "horizon": horizon, "sampler": sampler,
            "seed": cfg.seed, "device": cfg.device}
    bs = max(1, min(cfg.shard_size, 16))

    def make_ds():
        import ray.data

        return ray.data.from_arrow(t).repartition(max(1, (t.num_rows + bs - 1) // bs))

    def local():
        for rb in t.to_batches(max_chunksize=bs):
            yield pa.Table.from_batches([rb])

    parts = [b for b in executor.map_actors(_PredictActor, (plan,), make_ds=make_ds,
                                            local_batches=local, batch_size=bs,
                                            resources=stage.ctx.resources,
                                            num_batches=-(-t.num_rows // bs)) if b.num_rows]
    res = pa.concat_tables(parts)
    n = res.num_rows
    mean = {c: float(np.mean(res[c].to_numpy())) for c in ("best_mse", "mean_mse", "best_l1",
                                                             "copy_mse")}
    metrics = {"delta/best_of_n_mse": mean["best_mse"], "delta/mean_mse": mean["mean_mse"],
               "delta/best_of_n_l1": mean["best_l1"], "delta/copy_last_mse": mean["copy_mse"]}
    notes = ["delta tokens decode to VFM features, not pixels: no image metric"]
    if mean["copy_mse"] > _COPY_FLOOR:
        metrics["delta/best_of_n_vs_copy"] = mean["best_mse"] / mean["copy_mse"]
    else:
        notes.append(f"copying the last delta token is exact to {mean['copy_mse']:.1e} (the "
                     "tokens barely change between frames): best_of_n_vs_copy not reported")
    lineage = {"generator": {"uri": gen_ref.uri, "digest": gen_ref.digest},
               "tokens": {"uri": side.uri, "version": side.version,
                          "fingerprint": side.digest},
               "curated": {"uri": source.uri, "version": source.version}}
    details = {"reference": {"kind": "held-out delta tokens", "videos": n, "horizon": horizon},
               "lineage": lineage, "family": spec.name, "sampler": dict(cfg.sampler),
               "seed": cfg.seed, "shard_size": cfg.shard_size,
               "notes": [*notes, f"{int(res['hypotheses'][0].as_py())} hypotheses per video"]}
    stage.ctx.tracker.log_dict(details, "evaluation.json")
    return stage._write_results(metrics, n, None, details)
