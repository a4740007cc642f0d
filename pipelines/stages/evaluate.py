"""``evaluate.tokenizer``: how good are the tokenizer and the generator trained upstream?

Needs (``needs:``): the tokenize / ``cache.latents`` stage (its side table, the curated table it
was made from and the tokenizer it encoded with), optionally the ``train.tokenizer`` stage and,
for samples, the ``train.generator`` stage. Works for every tokenizer family whose spec can encode
and decode images (:mod:`vgen_core.families`): bit tokens (LFQ, binary FSQ), 1D ids (TiTok VQ)
and latents (KL-VAE, TiTok-KL).

**The tokenizer** is the ``train.tokenizer`` export when that stage is among ``needs``, else the
tokens stage's own ``tokenizer`` output (the exact model that encoded the rows), loaded with its
weights digest checked. Its family's spec says the pixel range and what encoding and decoding
mean; a reconstruction is :func:`vgen_core.eval.roundtrip.reconstruct` (tokens: the encoded ids
decoded; latents: the posterior mean, times the config's ``scale_factor``, decoded).

Metrics (written to MLflow and to the results table ``<dag>/<stage>``):

* ``recon/psnr``: mean PSNR (dB, images in [0, 1]) of tokenizer reconstructions over the curated
  samples the side table covers (curated image column, resized + center-cropped to the side
  table's recorded resolution), computed on the executor's actor pool (the tokenizer loads once
  per actor; in this process with the in-process executor) and merged on the driver as
  per-image sums;
* ``codebook/*`` (side tables of discrete ids only): usage (unique ids / codebook size), entropy
  and perplexity of the dataset's tokens; ``bits/balance_min``/``max`` (bit tokens only): the
  extreme per-bit frequencies of ones;
* ``samples/codebook_usage``: the same usage for ``num_samples`` generated token sequences;
* ``recon/rfid`` and ``samples/fid``: Fréchet distances (reconstructions vs originals, samples vs
  originals) from streaming, mergeable feature statistics; the extractor (the built-in
  ``tiny-conv-seed0-v1``, or the standard InceptionV3 from a local weights file) is recorded in
  the results table's ``extractor`` column, so numbers of different extractors are never mixed;
* image grids: originals over reconstructions, and decoded generator samples (fixed seed and
  round-robin labels, so runs compare side by side). Only label-conditioned generators are
  sampled here (``evaluate.generation`` handles text-conditioned ones).
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vgen_core import families
from vgen_core.data.images import IMAGE_COLUMNS, decode_image, pick_column, preprocess
from vgen_core.data.schemas import EVAL_RESULTS

from .base import (Counts, InProcessExecutor, JobStage, OutputRef, StageConfig, StageError,
                   StageResult, filter_to_key_set, filter_to_keys, resolve_device, row_keys)
from .evaluate_generation import decode_to_uint8, load_model_ref

__all__ = ["EvaluateTokenizerConfig", "EvaluateTokenizer", "build_extractor"]

log = logging.getLogger("vgen.evaluate")

#: curated rows per actor call
RECON_BATCH = 32


class EvaluateTokenizerConfig(StageConfig):
    resolution: int = Field(32, ge=8, description="crop size when the side table records none")
    extractor: str = Field("tiny-conv", pattern="^(tiny-conv|inception)$",
                           description="feature extractor for rFID / FID")
    inception_weights: str | None = Field(
        None, description="local pt_inception-2015-12-05 weights (extractor: inception)")
    num_samples: int = Field(16, ge=0, description="generator samples to draw (0 = none)")
    sample_steps: int = Field(8, ge=1)
    guidance_scale: float = Field(2.0, ge=0)
    seed: int = 0
    grid_size: int = Field(8, ge=1)


def build_extractor(cfg: EvaluateTokenizerConfig, device: Any = None):
    """The configured feature extractor (its ``name`` goes with every FID it produces)."""
    from vgen_core.eval.extractors import InceptionV3FID, TinyConvExtractor

    kw = {} if device is None else {"device": device}
    if cfg.extractor == "inception":
        if not cfg.inception_weights:
            raise StageError("with.extractor is 'inception' but with.inception_weights is not "
                             "set: give the local path of pt_inception-2015-12-05-6726825d.pth")
        return InceptionV3FID(cfg.inception_weights, **kw)
    return TinyConvExtractor(seed=0, **kw)


def _f64(a: Any) -> list[bytes]:
    a = np.ascontiguousarray(a, dtype="<f8")
    return [r.tobytes() for r in a]


def _unpack(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype="<f8") for b in col.to_pylist()])


def _keep_keys(batch: pa.Table, wanted: Any) -> pa.Table:
    """Ray Data map: rows of the curated table that the side table covers."""
    return filter_to_key_set(batch, wanted)


class _ReconActor:
    """One per actor: loads the tokenizer and the extractor once; a call turns a batch of curated
    rows into per-image PSNR and the features of originals and reconstructions."""

    def __init__(self, tokenizer: dict[str, Any], cfg: EvaluateTokenizerConfig, resolution: int,
                 column: str, device: str = "cpu"):
        self._tmp = tempfile.TemporaryDirectory()
        self.device = resolve_device(device)
        self.model = load_model_ref(tokenizer, self._tmp.name).to(self.device)
        self.spec = families.get(self.model.family)
        self.pixel_range = families.pixel_range_of(self.spec)
        self.resolution, self.column = resolution, column
        self.extractor = build_extractor(cfg, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from vgen_core.eval.recon import psnr
        from vgen_core.eval.roundtrip import reconstruct, to_unit

        keep, imgs = [], []
        for i, data in enumerate(batch[self.column].to_pylist()):
            try:  # undecodable samples were quarantined by the tokenize stage
                imgs.append(preprocess(decode_image(data), self.resolution))
                keep.append(i)
            except ValueError:
                continue
        if not imgs:
            return pa.table({"sample_id": batch["sample_id"].take(keep),  # its own type
                             "psnr": pa.array([], pa.float64()),
                             "feat_orig": pa.array([], pa.binary()),
                             "feat_rec": pa.array([], pa.binary())})
        # a context, not a global switch: this class also runs in the driver process
        with torch.inference_mode():
            x = families.to_model_pixels(torch.from_numpy(np.stack(imgs)), self.pixel_range)
            x = x.to(self.device)
            rec = reconstruct(self.spec, self.model, x)
            x01, r01 = to_unit(x, self.pixel_range), to_unit(rec, self.pixel_range)
            per_image = psnr(r01, x01, data_range=1.0, reduction="none")
            f_orig = self.extractor(x01).pool_BD.double().cpu().numpy()
            f_rec = self.extractor(r01).pool_BD.double().cpu().numpy()
        return pa.table({"sample_id": batch["sample_id"].take(keep),
                         "psnr": pa.array(per_image.cpu().numpy().astype(np.float64)),
                         "feat_orig": pa.array(_f64(f_orig), pa.binary()),
                         "feat_rec": pa.array(_f64(f_rec), pa.binary())})


class EvaluateTokenizer(JobStage):
    kind = "evaluate.tokenizer"
    version = 1
    Config = EvaluateTokenizerConfig
    needs_range = (1, 3)
    file_fields = ("inception_weights",)  # checked to exist before anything runs
    config: EvaluateTokenizerConfig

    # -- inputs ---------------------------------------------------------------------------
    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    def side_input(self) -> tuple[str, OutputRef, OutputRef]:
        """(tokens stage name, its side table, the curated table it was made from)."""
        found = [(u, outs["samples"], outs["source"]) for u, outs in self.ctx.inputs.items()
                 if "samples" in outs and "source" in outs]
        if len(found) != 1:
            raise StageError(f"{self._where()}: needs exactly one tokenize / cache.latents stage "
                             f"among `needs`, found {len(found)} (needs: the tokens stage, "
                             "optionally the train.tokenizer stage and, for samples, the "
                             "train.generator stage)")
        return found[0]

    def tokenizer_ref(self, up: str) -> OutputRef:
        """A ``train.tokenizer`` export among ``needs``, else the tokens stage's own
        ``tokenizer`` output (the model that encoded its rows)."""
        trained = [outs["tokenizer"] for outs in self.ctx.inputs.values()
                   if "tokenizer" in outs and "samples" not in outs]
        if trained:
            return trained[0]
        ref = self.ctx.inputs[up].get("tokenizer")
        if ref is None:
            raise StageError(f"{self._where()}: stage '{up}' recorded no tokenizer output (an "
                             f"older run) and no train.tokenizer stage is among `needs`; re-run "
                             f"'{up}' with `vgen run` to record it")
        return ref

    def generator_ref(self) -> OutputRef | None:
        refs = [outs["generator"] for outs in self.ctx.inputs.values() if "generator" in outs]
        return refs[0] if refs else None

    # -- the run --------------------------------------------------------------------------
    def run(self, executor: Any = None) -> StageResult:
        import torch

        from vgen_core.eval.fid import FeatureStats
        from vgen_core.tracking import image_grid

        from .reading import side_table_info

        executor = executor or InProcessExecutor()
        store, cfg, tracker, where = self.ctx.store, self.config, self.ctx.tracker, self._where()
        up, tokens, source = self.side_input()
        tok_ref = self.tokenizer_ref(up)
        gen_ref = self.generator_ref()
        resolution = int(side_table_info(store, tokens)["preprocess"].get("resolution")
                         or cfg.resolution)
        col = pick_column(store.schema(source.name).names, IMAGE_COLUMNS)
        if col is None:
            raise StageError(f"{where}: {source.uri} has no image column "
                             f"({', '.join(IMAGE_COLUMNS)}) to reconstruct")

        keys = store.read(source.name, version=source.version,
                          columns=["sample_id", "content_digest"])
        side_names = store.schema(tokens.name).names
        side_cols = [c for c in ("sample_id", "content_digest", "fingerprint", "indices",
                                 "token_bits", "codebook_size", "grid_h", "grid_w")
                     if c in side_names]
        tok_table = store.read(tokens.name, version=tokens.version, columns=side_cols)
        tok_table = filter_to_keys(tok_table.filter(pc.equal(tok_table["fingerprint"],
                                                             tokens.digest)), keys)
        if tok_table.num_rows == 0:
            raise StageError(f"{where}: no current tokens in {tokens.uri}")

        with tempfile.TemporaryDirectory() as tmp:
            try:
                tok = load_model_ref(tok_ref, f"{tmp}/tok")
                spec = families.get(tok.family, role="tokenizer", can="evaluate")
            except ValueError as e:
                raise StageError(f"{where}: {e}") from None
            pixel_range = families.pixel_range_of(spec)
            metrics: dict[str, float] = {}
            notes: dict[str, str] = {}

            # reconstruction PSNR + rFID over the curated samples the side table covers
            extractor = build_extractor(cfg)
            stats_orig = FeatureStats(extractor.dims, extractor.name)
            stats_rec = FeatureStats(extractor.dims, extractor.name)
            psnr_sum, n = self._reconstruct(executor, tok_ref, resolution, col, source, tok_table,
                                            stats_orig, stats_rec)
            if n == 0:
                raise StageError(f"{where}: none of the curated images in {source.uri} that "
                                 f"{tokens.uri} covers could be decoded")
            metrics["recon/psnr"] = psnr_sum / n
            # rFID: reconstructions vs originals, same extractor (named in the results table)
            if n >= 2:
                metrics["recon/rfid"] = stats_orig.frechet_distance(stats_rec)
            else:
                notes["recon/rfid"] = "fewer than 2 images"

            codebook_size = self._codebook_metrics(tok_table, metrics, notes)

            # originals over reconstructions
            first = tok_table.slice(0, cfg.grid_size)
            orig_np = self._originals(source, col, first, resolution)
            if len(orig_np):
                from vgen_core.eval.roundtrip import reconstruct

                with torch.inference_mode():
                    x = families.to_model_pixels(torch.from_numpy(orig_np), pixel_range)
                    rec = families.from_model_pixels(reconstruct(spec, tok, x),
                                                     pixel_range).cpu().numpy()
                tracker.log_image("recon_grid", image_grid(np.concatenate([orig_np, rec]),
                                                           nrow=len(rec)))

            n_samples = 0
            if gen_ref is not None and cfg.num_samples:
                n_samples = self._samples(gen_ref, tok, tok_table, codebook_size, extractor,
                                          stats_orig, metrics, notes, f"{tmp}/gen")
        for k, why in notes.items():
            log.warning("%s: %s skipped: %s", where, k, why)
        if notes:
            tracker.set_tags({f"vgen.eval.skipped.{k}": why for k, why in notes.items()})

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
                           metrics=metrics, counts=Counts(processed=n))  # samples reconstructed

    # -- pieces of the run ----------------------------------------------------------------
    def _reconstruct(self, executor: Any, tok_ref: OutputRef, resolution: int, col: str,
                     source: OutputRef, tok_table: pa.Table, stats_orig: Any,
                     stats_rec: Any) -> tuple[float, int]:
        """Per-image PSNR sums and feature statistics from the actor pool: (psnr sum, images)."""
        store = self.ctx.store
        cols = ["sample_id", "content_digest", col]
        wanted = row_keys(tok_table)
        gpus = float(getattr(self.ctx.resources, "gpus", 0.0) or 0.0)
        args = (tok_ref.to_json(), self.config, resolution, col, "auto" if gpus else "cpu")

        def make_ds():
            import ray.data

            ds = ray.data.read_delta(source.uri, version=source.version, columns=cols,
                                     storage_options=store.worker_storage_options() or None)
            return ds.map_batches(_keep_keys, fn_args=(wanted,), batch_format="pyarrow")

        def local():
            t = store.read(source.name, version=source.version, columns=cols)
            t = filter_to_key_set(t, wanted)
            for rb in t.to_batches(max_chunksize=RECON_BATCH):
                yield pa.Table.from_batches([rb])

        psnr_sum, n = 0.0, 0
        for b in executor.map_actors(_ReconActor, args, make_ds=make_ds, local_batches=local,
                                     batch_size=RECON_BATCH, resources=self.ctx.resources):
            if not b.num_rows:
                continue
            psnr_sum += float(np.sum(b["psnr"].to_numpy()))
            n += b.num_rows
            stats_orig.update(_unpack(b["feat_orig"]))
            stats_rec.update(_unpack(b["feat_rec"]))
        return psnr_sum, n

    def _codebook_metrics(self, tok_table: pa.Table, metrics: dict[str, float],
                          notes: dict[str, str]) -> int | None:
        """``codebook/*`` for discrete ids, ``bits/balance_*`` for bit tokens; returns the
        codebook size (None: the side table holds no ids)."""
        import torch

        from vgen_core.eval.recon import bit_balance, codebook_usage

        names = tok_table.column_names
        if "indices" not in names:
            return None
        bits = int(tok_table["token_bits"][0].as_py()) if "token_bits" in names else None
        if "codebook_size" in names:
            size = int(tok_table["codebook_size"][0].as_py())
        elif bits is not None:
            size = 1 << bits
        else:
            notes["codebook"] = "the side table records neither codebook_size nor token_bits"
            return None
        idx = np.concatenate([np.asarray(r, dtype=np.int64)
                              for r in tok_table["indices"].to_pylist()])
        for k, v in codebook_usage(torch.from_numpy(idx), size).items():
            metrics[f"codebook/{k}"] = float(v)
        if bits is not None:
            # the bit convention of bit-token tables (index = sum bit_k 2^k), not a family's
            from vgen_core.tokenizers.lfq import indices_to_bits

            balance = bit_balance(indices_to_bits(torch.from_numpy(idx), bits))
            metrics["bits/balance_min"] = float(balance.min())
            metrics["bits/balance_max"] = float(balance.max())
        return size

    def _originals(self, source: OutputRef, col: str, first: pa.Table,
                   resolution: int) -> np.ndarray:
        """The curated images of ``first``'s rows, in its order, preprocessed (uint8 BHWC)."""
        store = self.ctx.store
        originals = store.read(source.name, version=source.version,
                               columns=["sample_id", "content_digest", col])
        originals = filter_to_keys(originals, first.select(["sample_id", "content_digest"]))
        order = {s: i for i, s in enumerate(first["sample_id"].to_pylist())}
        imgs = []
        for _, data in sorted(zip(originals["sample_id"].to_pylist(),
                                  originals[col].to_pylist()), key=lambda t: order[t[0]]):
            try:
                imgs.append(preprocess(decode_image(data), resolution))
            except ValueError:
                continue
        return (np.stack(imgs) if imgs
                else np.zeros((0, resolution, resolution, 3), np.uint8))

    def _samples(self, gen_ref: OutputRef, tok: Any, tok_table: pa.Table,
                 codebook_size: int | None, extractor: Any, stats_orig: Any,
                 metrics: dict[str, float], notes: dict[str, str], tmp: str) -> int:
        """Draw ``num_samples`` from a label-conditioned generator (fixed seed, round-robin
        labels), decode them with the tokenizer; returns how many were drawn."""
        import torch

        from vgen_core.eval.fid import FeatureStats
        from vgen_core.eval.recon import codebook_usage
        from vgen_core.tracking import image_grid

        cfg, where = self.config, self._where()
        try:
            gen = load_model_ref(gen_ref, tmp)
            gspec = families.get(gen.family, role="generator", can="sample")
        except ValueError as e:
            raise StageError(f"{where}: {e}") from None
        if gspec.conditioning != "labels":
            notes["samples"] = (f"the {gspec.name} generator is conditioned on "
                                f"{gspec.conditioning}, not class labels; sample it with "
                                "evaluate.generation")
            return 0
        sampler = gspec.hook("sampler")
        params = inspect.signature(sampler).parameters
        options = {k: v for k, v in (("steps", cfg.sample_steps),
                                     ("guidance_scale", cfg.guidance_scale)) if k in params}
        classes = int(getattr(gen.config, "num_classes", 1) or 1)
        labels = torch.arange(cfg.num_samples) % classes
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.inference_mode():
            out = sampler(gen, labels, generator=g, **options)
        if gspec.output == "tokens" and codebook_size is not None:
            s_usage = codebook_usage(out.flatten(), codebook_size)
            metrics["samples/codebook_usage"] = float(s_usage["usage_fraction"])
        names = tok_table.column_names
        grid_hw = ((int(tok_table["grid_h"][0].as_py()), int(tok_table["grid_w"][0].as_py()))
                   if "grid_h" in names and "grid_w" in names else None)
        try:
            with torch.inference_mode():
                imgs = decode_to_uint8(tok, out, grid_hw)
                feats = extractor(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
        except ValueError as e:
            raise StageError(f"{where}: cannot decode the {gspec.name} samples with the "
                             f"{tok.family} tokenizer: {e}") from None
        self.ctx.tracker.log_image("samples_grid", image_grid(imgs, nrow=cfg.grid_size))
        n_samples = cfg.num_samples
        if n_samples >= 2:  # FID against the curated images (tiny n: a trend, no more)
            stats_gen = FeatureStats(extractor.dims, extractor.name)
            stats_gen.update(feats.pool_BD.double().numpy())
            metrics["samples/fid"] = stats_orig.frechet_distance(stats_gen)
        return n_samples
