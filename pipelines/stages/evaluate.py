"""``evaluate.tokenizer``: how good are the tokenizer and the generator trained upstream?

Metrics (written to MLflow and to the results table ``<dag>/<stage>``):

* ``recon/psnr``: mean PSNR (dB, images in [0, 1]) of tokenizer reconstructions over the curated
  samples the token table covers, computed on a Ray Data actor pool (the tokenizer loads once per
  actor) and merged on the driver as per-image sums;
* ``codebook/*``: usage (unique ids / codebook size), entropy and perplexity of the dataset's
  tokens, and ``bits/balance_min``/``max``: the extreme per-bit frequencies of ones;
* ``samples/codebook_usage``: the same usage for ``num_samples`` generated token grids;
* ``recon/rfid`` and ``samples/fid``: Fréchet distances (reconstructions vs originals, samples vs
  originals) from streaming, mergeable feature statistics; the extractor (the built-in
  ``tiny-conv-seed0-v1``, or the standard InceptionV3 from a local weights file) is recorded in
  the results table's ``extractor`` column, so numbers of different extractors are never mixed;
* image grids: originals over reconstructions, and decoded generator samples (fixed seed and
  labels, so runs compare side by side).
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vgen_core.data.schemas import EVAL_RESULTS

from .base import JobStage, OutputRef, StageConfig, StageError, StageResult, filter_to_keys
from .tokenize import fetch_model_dir, preprocess


class EvaluateTokenizerConfig(StageConfig):
    resolution: int = Field(32, ge=8)
    extractor: str = Field("tiny-conv", pattern="^(tiny-conv|inception)$",
                           description="feature extractor for rFID / FID")
    inception_weights: str | None = Field(
        None, description="local pt_inception-2015-12-05 weights (extractor: inception)")
    num_samples: int = Field(16, ge=0, description="generator samples to draw (0 = none)")
    sample_steps: int = Field(8, ge=1)
    guidance_scale: float = Field(2.0, ge=0)
    seed: int = 0
    grid_size: int = Field(8, ge=1)


def build_extractor(cfg: EvaluateTokenizerConfig):
    """The configured feature extractor (its ``name`` goes with every FID it produces)."""
    from vgen_core.eval.extractors import InceptionV3FID, TinyConvExtractor

    if cfg.extractor == "inception":
        if not cfg.inception_weights:
            raise StageError("with.extractor is 'inception' but with.inception_weights is not "
                             "set: give the local path of pt_inception-2015-12-05-6726825d.pth")
        return InceptionV3FID(cfg.inception_weights)
    return TinyConvExtractor(seed=0)


class _ReconActor:
    def __init__(self, tokenizer_uri: str, cfg: EvaluateTokenizerConfig):
        from vgen_core.tokenizers.io import load_pretrained

        self._tmp = tempfile.TemporaryDirectory()
        self.model = load_pretrained(fetch_model_dir(tokenizer_uri, self._tmp.name),
                                     expected_family="lfq").eval()
        self.resolution = cfg.resolution
        self.extractor = build_extractor(cfg)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        from vgen_core.data.sample_images import decode_png
        from vgen_core.eval.recon import psnr
        from vgen_core.training.tasks import images_to_model

        imgs = np.stack([preprocess(decode_png(b), self.resolution)
                         for b in batch["image_png"].to_pylist()])
        with torch.inference_mode():
            x = images_to_model(torch.from_numpy(imgs))
            q, _, _, _ = self.model.encode(x)
            rec = self.model.decode(q).clamp(-1, 1)
        x01, r01 = (x + 1) / 2, (rec + 1) / 2
        per_image = psnr(r01, x01, data_range=1.0, reduction="none")
        with torch.inference_mode():
            f_orig = self.extractor(x01.clamp(0, 1)).pool_BD.double().numpy()
            f_rec = self.extractor(r01.clamp(0, 1)).pool_BD.double().numpy()
        return {"sample_id": np.asarray(batch["sample_id"].to_pylist(), dtype=object),
                "psnr": per_image.numpy().astype(np.float64),
                "feat_orig": f_orig, "feat_rec": f_rec}


class EvaluateTokenizer(JobStage):
    kind = "evaluate.tokenizer"
    version = 1
    Config = EvaluateTokenizerConfig
    needs_range = (2, 3)
    config: EvaluateTokenizerConfig

    def _find(self, key: str, required: bool = True) -> OutputRef | None:
        refs = [o[key] for o in self.ctx.inputs.values() if key in o]
        if not refs and required:
            raise StageError(f"stage '{self.ctx.stage}': no upstream stage produced a '{key}' "
                             "(needs: the train.tokenizer stage, the tokenize stage and, for "
                             "samples, the train.generator stage)")
        return refs[0] if refs else None

    def run(self, executor: Any = None) -> StageResult:
        import ray.data
        import torch

        from vgen_core.eval.recon import bit_balance, codebook_usage
        from vgen_core.tokenizers.io import load_pretrained
        from vgen_core.tracking import image_grid

        store, cfg, tracker = self.ctx.store, self.config, self.ctx.tracker
        tok_ref, tokens, source = self._find("tokenizer"), self._find("samples"), self._find("source")
        gen_ref = self._find("generator", required=False)
        keys = store.read(source.name, version=source.version,
                          columns=["sample_id", "content_digest"])
        tok_table = store.read(tokens.name, version=tokens.version)
        tok_table = filter_to_keys(tok_table.filter(pc.equal(tok_table["fingerprint"],
                                                             tokens.digest)), keys)
        if tok_table.num_rows == 0:
            raise StageError(f"stage '{self.ctx.stage}': no current tokens in {tokens.uri}")
        metrics: dict[str, float] = {}

        # reconstruction PSNR over the curated samples, on an actor pool
        from pipelines.dag.ray_exec import actor_cpus, pool_size

        ds = ray.data.read_delta(source.uri, version=source.version,
                                 columns=["sample_id", "image_png"],
                                 storage_options=store.storage_options or None)
        ds = ds.map_batches(_ReconActor, fn_constructor_args=(tok_ref.uri, cfg),
                            batch_format="pyarrow", batch_size=32,
                            compute=ray.data.ActorPoolStrategy(
                                min_size=1, max_size=pool_size(self.ctx.resources, self.ctx.cluster)),
                            num_cpus=actor_cpus(self.ctx.resources, self.ctx.cluster))
        from vgen_core.eval.fid import FeatureStats

        extractor = build_extractor(cfg)
        stats_orig = FeatureStats(extractor.dims, extractor.name)
        stats_rec = FeatureStats(extractor.dims, extractor.name)
        psnr_sum, n = 0.0, 0
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            psnr_sum += float(np.sum(b["psnr"]))
            n += len(b["psnr"])
            stats_orig.update(np.asarray(b["feat_orig"]))
            stats_rec.update(np.asarray(b["feat_rec"]))
        metrics["recon/psnr"] = psnr_sum / max(n, 1)
        # rFID: reconstructions vs originals, same extractor (named in the results table)
        metrics["recon/rfid"] = stats_orig.frechet_distance(stats_rec)

        bits = int(tok_table["token_bits"][0].as_py())
        idx = np.concatenate([np.asarray(r, dtype=np.int64)
                              for r in tok_table["indices"].to_pylist()])
        usage = codebook_usage(torch.from_numpy(idx), 1 << bits)
        for k, v in usage.items():
            metrics[f"codebook/{k}"] = float(v)
        from vgen_core.tokenizers.lfq import indices_to_bits

        balance = bit_balance(indices_to_bits(torch.from_numpy(idx), bits))
        metrics["bits/balance_min"] = float(balance.min())
        metrics["bits/balance_max"] = float(balance.max())

        with tempfile.TemporaryDirectory() as tmp:
            tok = load_pretrained(fetch_model_dir(tok_ref.uri, f"{tmp}/tok"),
                                  expected_family="lfq").eval()
            h = int(tok_table["grid_h"][0].as_py())
            w = int(tok_table["grid_w"][0].as_py())
            first = tok_table.slice(0, cfg.grid_size)
            recon_idx = torch.tensor(first["indices"].to_pylist(), dtype=torch.long).view(-1, h, w)
            originals = store.read(source.name, version=source.version)
            originals = filter_to_keys(originals, first.select(["sample_id", "content_digest"]))
            order = {s: i for i, s in enumerate(first["sample_id"].to_pylist())}
            from vgen_core.data.sample_images import decode_png

            orig = sorted(zip(originals["sample_id"].to_pylist(),
                              originals["image_png"].to_pylist()), key=lambda t: order[t[0]])
            orig_np = np.stack([preprocess(decode_png(b), cfg.resolution) for _, b in orig])
            with torch.inference_mode():
                rec = _to_uint8(tok.decode_indices(recon_idx))
            tracker.log_image("recon_grid", image_grid(np.concatenate([orig_np, rec]),
                                                           nrow=len(rec)))
            n_samples = 0
            if gen_ref is not None and cfg.num_samples:
                from vgen_core.generators.masked import sample

                gen = load_pretrained(fetch_model_dir(gen_ref.uri, f"{tmp}/gen"),
                                      expected_family="maskgit").eval()
                g = torch.Generator().manual_seed(cfg.seed)
                labels = torch.arange(cfg.num_samples) % gen.config.num_classes
                toks = sample(gen, labels, steps=cfg.sample_steps,
                              guidance_scale=cfg.guidance_scale, generator=g)
                s_usage = codebook_usage(toks.flatten(), 1 << bits)
                metrics["samples/codebook_usage"] = float(s_usage["usage_fraction"])
                with torch.inference_mode():
                    imgs = _to_uint8(tok.decode_indices(toks.view(-1, h, w)))
                    feats = extractor(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
                tracker.log_image("samples_grid", image_grid(imgs, nrow=cfg.grid_size))
                n_samples = cfg.num_samples
                if n_samples >= 2:  # FID against the curated images (tiny n: a trend, no more)
                    stats_gen = FeatureStats(extractor.dims, extractor.name)
                    stats_gen.update(feats.pool_BD.double().numpy())
                    metrics["samples/fid"] = stats_orig.frechet_distance(stats_gen)

        now = dt.datetime.now(dt.timezone.utc)
        rows = [{"stage": self.ctx.stage, "fingerprint": self.ctx.row_fingerprint, "metric": k,
                 "value": float(v), "num_samples": n_samples if k.startswith("samples/") else
                 (n if k.startswith("recon/") else tok_table.num_rows),
                 "extractor": extractor.name if "fid" in k else None,
                 "details": json.dumps({"tokens": tokens.uri, "version": tokens.version}),
                 "recorded_at": now} for k, v in metrics.items()]
        name = self.table_name()
        version = store.append(name, pa.Table.from_pylist(rows, schema=EVAL_RESULTS),
                               commit_metadata={"vgen.stage": self.ctx.stage})
        return StageResult(outputs={"results": OutputRef("table", name, store.uri(name),
                                                         version=version)},
                           metrics=metrics)


def _to_uint8(images_BCHW) -> np.ndarray:
    x = images_BCHW.clamp(-1, 1).add(1).mul(127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()
