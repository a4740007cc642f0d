"""``evaluate.generation``: sample a trained generator, decode, and score it as the ADM suite does.

Needs (``needs:``): the ``train.generator`` stage, the tokenize / ``cache.latents`` stage whose
side table the generator trained on, and optionally the ``train.tokenizer`` stage behind it::

    eval: {uses: evaluate.generation, needs: [maskgit, tokens], with: {num_samples: 50000}}

**The decoder.** Generated tokens/latents are decoded by exactly the tokenizer that made the
training tokens: the tokenize / cache stage outputs it (``tokenizer``, a model reference with its
weights digest), and this stage loads that reference. What decoding means (and the pixel range
of the result) is the tokenizer family's ``decode`` (:mod:`vgen_core.families`); what sampling
means is the generator family's ``sampler`` and ``conditioning``.

**The generator** is a ``train.generator`` stage's export or a released checkpoint brought in by
``import.weights`` (same output). A generator of a released size samples with that size's
released inference settings (``FamilySpec.sampling``, e.g. RAR-B's guidance 16.0 / power 2.75);
``with.sampler`` overrides single keys; the settings used are in the results' details. Every
key must be a keyword of the family's ``sample`` (checked before sampling), e.g. GRAT attention
for DeepFlow, xAR and DiMR: ``{attention: grat, grat_groups: [gh, gw], grat_variant: block,
grat_radius: 1}`` (training-free, see each family's ``sample``); like any sampler key it is in the
row fingerprint, and ``sample_seconds_per_image`` compares it with a dense evaluation.

**Sampling.** Class-conditional generators get class-balanced labels (round-robin, so every
prefix is balanced; ``per_class: 50`` with 1000 classes is ADM's 50k), MaskGen gets the side
table's captions (current rows, sorted by ``sample_id``, cycled). Samples are cut into shards of
``shard_size``; shard ``i`` draws with seed ``seed + i`` (ADM's ``42 + rank``, with the shard as
the rank), so the images do not depend on how many actors ran. Shards run on a Ray actor pool
from the stage's executor, sized like per-sample stages (:mod:`pipelines.stages.resources`: one
actor on 2 cores; GPU actors when ``resources.gpus``); each actor loads generator, decoder and
extractor once, samples, decodes, and returns features only (plus the few images of the grid).
With the in-process executor (unit tests) the same actor class runs in this process.

**Metrics** (results table ``<dag>/<stage>``, one row per metric, the extractor named on every
feature-based row; MLflow metrics on the stage run): ``fid`` and ``sfid`` from streaming
:class:`~vgen_core.eval.fid.FeatureStats`, ``is``/``is_std`` from the extractor's logits,
``precision``/``recall`` (k = ``pr_k``) against a deterministic subset of reference points, and
``codebook_usage`` of the generated tokens. The extractor is InceptionV3 (the FID port) when
``extractor_weights`` names its local weights file, else the built-in tiny conv net, whose
numbers only compare with themselves.

**Reference statistics** come from the curated table version the tokens were made from, images
center-cropped to the tokenizer's resolution, cached in ``_vgen/reference_stats`` by (curated
uri, version, extractor, resolution) so another evaluation of the same version does not
re-extract (:mod:`vgen_core.eval.reference`); or from an ADM reference batch
(``reference_npz:``, local or s3://), whose moments are used only with the InceptionV3 port
(results then say ``comparable_to_published: true``).

**Incremental.** The row fingerprint covers the generator digest, the tokenizer (export digest,
or the tokenize fingerprint that covers its weights), the sampling config, the reference and the
extractor (name and weights digest): an unchanged evaluation is skipped by the runner.
"""

from __future__ import annotations

import datetime as dt
import inspect
import io
import json
import tempfile
import time
from typing import Any, Literal, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vgen_core import families
from vgen_core.data.fsio import fetch_file, fetch_model_dir, file_digest
from vgen_core.data.images import IMAGE_COLUMNS, decode_image, pick_column, preprocess
from vgen_core.data.schemas import EVAL_RESULTS

from .base import (InProcessExecutor, JobStage, OutputRef, StageConfig, StageError, StageResult,
                   resolve_device)

__all__ = ["EvaluateGenerationConfig", "EvaluateGeneration", "load_model_ref", "decode_to_uint8"]


class EvaluateGenerationConfig(StageConfig):
    num_samples: int = Field(50000, ge=2, description="images to generate (ADM: 50000)")
    per_class: int | None = Field(None, ge=1, description="images per class (ADM: 50); sets "
                                  "num_samples = per_class x the generator's classes")
    seed: int = Field(42, description="shard i samples with seed + i (ADM: 42 + rank)")
    shard_size: int = Field(64, ge=1, description="samples per shard: one seed, one actor call")
    sampler: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the "
                                    "family's `sample` (steps, guidance_scale, ...); unset ones "
                                    "keep the papers' defaults")
    extractor_weights: str | None = Field(None, description="local (or s3://) FID InceptionV3 "
                                          "weights (pt_inception-2015-12-05-6726825d.pth); unset: "
                                          "the tiny-conv extractor")
    inception_preprocess: Literal["tf1", "pytorch-fid"] = Field(
        "tf1", description="tf1 = the TF graph's resize (ADM reference batches); or pytorch-fid")
    reference_npz: str | None = Field(None, description="ADM reference batch (.npz with mu/sigma "
                                      "or arr_0 images), local or s3://; default: the curated "
                                      "table the tokens were made from")
    reference_features: int = Field(10000, ge=0, description="reference points kept for "
                                    "precision/recall (ADM: its 10k reference images)")
    pr_k: int = Field(3, ge=1, description="k of the k-NN manifolds (ADM: 3)")
    is_splits: int = Field(10, ge=1, description="Inception Score splits (ADM: 10)")
    grid_images: int = Field(32, ge=0, description="first samples shown in the MLflow grid")
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ---------------------------------------------------------------------------------------------
# Model loading and decoding (run inside the actors)
# ---------------------------------------------------------------------------------------------


def load_model_ref(ref: dict[str, Any] | OutputRef, tmp: str):
    """The model an output reference names (a ``save_pretrained`` directory, local or remote),
    in eval mode; ValueError when its weights are not the ones the reference recorded."""
    from vgen_core.tokenizers.io import load_pretrained, weights_digest

    ref = OutputRef.from_json(ref) if isinstance(ref, dict) else ref
    model = load_pretrained(fetch_model_dir(ref.uri, tmp))
    if ref.digest and weights_digest(model) != ref.digest:
        raise ValueError(f"the model at {ref.uri} is not the one recorded (digest "
                         f"{ref.digest[:12]}); re-run the stage that wrote it")
    return model.eval()


def decode_to_uint8(tokenizer: Any, out: Any, grid_hw: tuple[int, int] | None) -> np.ndarray:
    """Generated tokens (B, L) / latents -> uint8 images (B, H, W, 3), through the tokenizer
    family's ``decode`` and pixel range."""
    spec = families.get(tokenizer.family)
    if spec.decode is None:
        decodable = [s.name for s in families.all_specs("tokenizer") if s.decode is not None]
        raise ValueError(f"cannot decode generated samples with a '{spec.name}' tokenizer "
                         f"(decodable: {', '.join(decodable)})")
    x = spec.decode(tokenizer, out, grid_hw)
    return families.from_model_pixels(x, families.pixel_range_of(spec)).cpu().numpy()


def build_extractor(spec: dict[str, Any], tmp: str, device: Any):
    from vgen_core.eval.extractors import InceptionV3FID, TinyConvExtractor

    if spec.get("weights"):
        return InceptionV3FID(fetch_file(spec["weights"], tmp), preprocess=spec["preprocess"],
                              device=device)
    return TinyConvExtractor(seed=0, device=device)


def _device(want: str):
    return resolve_device(want)


def _f32(a: Any) -> list[bytes]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return [r.tobytes() for r in a]


def _unpack(col: pa.ChunkedArray | pa.Array, dims: int | None = None) -> np.ndarray:
    rows = [np.frombuffer(b, dtype="<f4") for b in col.to_pylist()]
    if not rows:
        return np.zeros((0, dims or 0), np.float32)
    return np.stack(rows)


class _SampleActor:
    """One per actor: loads generator, decoder and extractor once; a call runs whole shards."""

    def __init__(self, plan: dict[str, Any]):
        self.plan, self.device = plan, _device(plan["device"])
        self._tmp = tempfile.TemporaryDirectory()
        self.generator = load_model_ref(plan["generator"], f"{self._tmp.name}/gen").to(self.device)
        self.decoder = load_model_ref(plan["tokenizer"], f"{self._tmp.name}/tok").to(self.device)
        self.extractor = build_extractor(plan["extractor"], self._tmp.name, self.device)
        spec = families.get(self.generator.family)
        self.sample_fn = spec.hook("sampler")
        self.condition, self.output = spec.conditioning, spec.output
        self.grid_hw = tuple(plan["grid_hw"]) if plan.get("grid_hw") else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        # a context, not torch.set_grad_enabled(False): this class also runs in the driver
        # process (no Ray), where a global switch would leak into everything after it
        with torch.inference_mode():
            return pa.concat_tables([self.run_shard(s) for s in batch.to_pylist()])

    def run_shard(self, shard: dict[str, Any]) -> pa.Table:
        import torch

        g = torch.Generator(device=self.device).manual_seed(self.plan["seed"] + shard["shard"])
        if self.condition == "text":
            from vgen_core.generators.text import encode_text

            cond = encode_text(list(shard["captions"])).to(self.device)
        else:
            cond = torch.tensor(shard["labels"], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.sample_fn(self.generator, cond, generator=g, **self.plan["sampler"])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start  # the generator's sampling alone
            images = decode_to_uint8(self.decoder, out, self.grid_hw)
            f = self.extractor(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        n, start = len(images), int(shard["start"])
        index = np.arange(start, start + n)
        pngs = [_png(im) if i < self.plan["grid_images"] else b"" for i, im in zip(index, images)]
        tokens = ([np.ascontiguousarray(t, dtype="<i4").tobytes()
                   for t in out.reshape(n, -1).cpu().numpy()]
                  if self.output == "tokens" else [b""] * n)
        return pa.table({
            "index": pa.array(index, pa.int64()),
            "pool": pa.array(_f32(f.pool_BD.cpu()), pa.binary()),
            "logits": pa.array(_f32(f.logits_BK.cpu()) if f.logits_BK is not None else [b""] * n,
                               pa.binary()),
            "spatial": pa.array(_f32(f.spatial_BS.cpu()) if f.spatial_BS is not None
                                else [b""] * n, pa.binary()),
            "tokens": pa.array(tokens, pa.binary()),
            "png": pa.array(pngs, pa.binary()),
            "seconds": pa.array([seconds / n] * n, pa.float64()),
        })


class _ReferenceActor:
    """Features of curated images, center-cropped to ``resolution`` (the tokenizer's input)."""

    def __init__(self, extractor: dict[str, Any], resolution: int, column: str, device: str):
        self._tmp = tempfile.TemporaryDirectory()
        self.device = _device(device)
        self.extractor = build_extractor(extractor, self._tmp.name, self.device)
        self.resolution, self.column = resolution, column

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        with torch.inference_mode():
            return self._features(batch)

    def _features(self, batch: pa.Table) -> pa.Table:
        import torch

        keep, imgs = [], []
        for i, b in enumerate(batch[self.column].to_pylist()):
            try:  # undecodable samples were quarantined by the tokenize stage: not reference
                imgs.append(preprocess(decode_image(b), self.resolution))
                keep.append(i)
            except ValueError:
                continue
        if not imgs:
            return pa.table({"sample_id": pa.array([], pa.string()),
                             "pool": pa.array([], pa.binary()),
                             "spatial": pa.array([], pa.binary())})
        f = self.extractor(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous())
        n = len(imgs)
        return pa.table({
            "sample_id": batch["sample_id"].take(keep),
            "pool": pa.array(_f32(f.pool_BD.cpu()), pa.binary()),
            "spatial": pa.array(_f32(f.spatial_BS.cpu()) if f.spatial_BS is not None
                                else [b""] * n, pa.binary()),
        })


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _file_identity(uri: str) -> str:
    """Cheap identity of a (local or remote) file: size and modification time / ETag."""
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise StageError(f"reference_npz {uri} not found; give a local path or s3:// URI of an "
                         "ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)") from None
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("created")
    return f"size={info.get('size')};stamp={stamp}"


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class EvaluateGeneration(JobStage):
    kind = "evaluate.generation"
    version = 1
    Config = EvaluateGenerationConfig
    needs_range = (2, 3)
    file_fields = ("extractor_weights", "reference_npz")  # checked to exist before anything runs
    config: EvaluateGenerationConfig

    # -- inputs ---------------------------------------------------------------------------
    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    def _refs(self, key: str) -> list[tuple[str, OutputRef]]:
        return [(u, outs[key]) for u, outs in self.ctx.inputs.items() if key in outs]

    @overload
    def generator_ref(self, required: Literal[True] = ...) -> OutputRef: ...
    @overload
    def generator_ref(self, required: bool) -> OutputRef | None: ...

    def generator_ref(self, required: bool = True) -> OutputRef | None:
        refs = self._refs("generator")
        if len(refs) != 1 and (required or len(refs) > 1):
            raise StageError(f"{self._where()}: needs exactly one train.generator stage among "
                             f"`needs`, found {len(refs)}")
        return refs[0][1] if refs else None

    @overload
    def side_input(self, required: Literal[True] = ...) -> tuple[str, OutputRef, OutputRef]: ...
    @overload
    def side_input(self, required: bool) -> tuple[str, OutputRef, OutputRef] | None: ...

    def side_input(self, required: bool = True) -> tuple[str, OutputRef, OutputRef] | None:
        """(tokenize stage name, its side table, the curated table it was made from)."""
        found = [(u, outs["samples"], outs["source"]) for u, outs in self.ctx.inputs.items()
                 if "samples" in outs and "source" in outs]
        if len(found) != 1:
            if not required and not found:
                return None
            raise StageError(f"{self._where()}: needs exactly one tokenize / cache.latents stage "
                             f"(the one the generator trained on) among `needs`, found "
                             f"{len(found)}: it gives the tokenizer that decodes samples and the "
                             "curated table for reference statistics")
        return found[0]

    def extractor_spec(self) -> dict[str, Any]:
        cfg = self.config
        return {"weights": cfg.extractor_weights, "preprocess": cfg.inception_preprocess}

    def extractor_name(self) -> str:
        if self.config.extractor_weights:
            return ("inception-v3-fid-tf1" if self.config.inception_preprocess == "tf1"
                    else "inception-v3-fid-pt")
        return "tiny-conv-seed0-v1"

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """Generator digest, tokenizer (export digest / tokenize fingerprint), reference source,
        extractor name and weights digest. (Sampling config is in the config part.)"""
        gen = self.generator_ref(required=False)
        side = self.side_input(required=False)
        # a train.tokenizer among needs (the tokens stage's own tokenizer output is implied by
        # its side table's fingerprint, "tokens")
        tok = [(u, outs["tokenizer"]) for u, outs in self.ctx.inputs.items()
               if "tokenizer" in outs and "samples" not in outs]
        ext: dict[str, Any] = {"name": self.extractor_name()}
        if self.config.extractor_weights:
            try:
                ext["weights"] = file_digest(self.config.extractor_weights,
                                             what="extractor_weights")
            except FileNotFoundError as e:
                raise StageError(f"{self._where()}: {e}") from None
        reference: dict[str, Any] | None
        if self.config.reference_npz:
            reference = {"npz": self.config.reference_npz,
                         "file": _file_identity(self.config.reference_npz)}
        else:
            reference = {"table": side[2].uri, "version": side[2].version} if side else None
        defaults = None
        if gen is not None:  # the family's released sampler settings for this size
            try:
                gen_cfg = _model_config(gen.uri)
                spec = families.get(str(gen_cfg.get("family")))
                defaults = self.sampler_options(spec, gen_cfg)[1]
            except (StageError, ValueError):
                defaults = None
        return {"generator": gen.digest if gen else None, "sampler": defaults,
                "tokenizer": tok[0][1].digest if tok else None,
                "tokens": side[1].digest if side else None,
                "reference": reference, "extractor": ext}

    # -- the decoder ----------------------------------------------------------------------
    def tokenizer_output(self, up: str) -> OutputRef:
        """The model the tokens stage ``up`` encoded with (its ``tokenizer`` output)."""
        ref = self.ctx.inputs[up].get("tokenizer")
        if ref is None:
            raise StageError(f"{self._where()}: stage '{up}' recorded no tokenizer output (an "
                             f"older run); re-run '{up}' with `vgen run` to record it")
        return ref

    def decoder_info(self, tok: OutputRef) -> tuple[str, dict[str, Any]]:
        """(family, config.json) of the tokenizer export, read on the driver."""
        cfg = _model_config(tok.uri)
        if tok.digest and cfg.get("weights_digest") not in (None, tok.digest):
            raise StageError(f"{self._where()}: the tokenizer at {tok.uri} is no longer the one "
                             f"that made the tokens (digest {cfg.get('weights_digest')} vs "
                             f"{tok.digest}); re-run the tokenize stage and the generator")
        return str(cfg.get("family") or "unknown"), cfg

    # -- the run --------------------------------------------------------------------------
    def run(self, executor: Any = None) -> StageResult:
        import torch

        from vgen_core.eval.fid import FeatureStats
        from vgen_core.eval.recon import codebook_usage
        from vgen_core.eval.reference import generation_metrics
        from vgen_core.tracking import image_grid

        from .reading import data_facts, side_table_info

        executor = executor or InProcessExecutor()
        store, cfg, tracker, where = self.ctx.store, self.config, self.ctx.tracker, self._where()
        gen_ref = self.generator_ref()
        up, side, source = self.side_input()
        gen_cfg = _model_config(gen_ref.uri)
        family = gen_cfg.get("family")
        try:
            if not family:
                raise ValueError(f"{gen_ref.uri}/config.json names no model family (not a vgen "
                                 "export); re-run the train stage")
            spec = families.get(family, role="generator", can="sample")
        except ValueError as e:
            raise StageError(f"{where}: {e}") from None
        self._check_sampler(spec)
        released, sampler = self.sampler_options(spec, gen_cfg)
        facts = data_facts(store, side, where)
        self._check_fits(gen_cfg, facts, gen_ref, side)
        if spec.output == "delta_tokens":
            from .evaluate_deltas import evaluate_predictions

            return evaluate_predictions(self, executor, spec, gen_ref, side, source, facts)
        tok = self.tokenizer_output(up)
        tok_family, _ = self.decoder_info(tok)
        resolution = side_table_info(store, side)["preprocess"].get("resolution")
        if resolution is None:
            raise StageError(f"{where}: {side.uri} records no preprocessing resolution; re-run "
                             f"'{up}' (a newer vgen records it)")
        n, shards = self._shards(spec, gen_cfg, side, source)
        ext = self.extractor_spec()
        ext_name = self.extractor_name()

        ref = self.reference(executor, ext, int(resolution), source)
        plan = {"generator": gen_ref.to_json(), "tokenizer": tok.to_json(),
                "extractor": ext, "sampler": sampler, "seed": cfg.seed,
                "grid_images": cfg.grid_images, "device": cfg.device,
                "grid_hw": _grid_hw(store, side)}
        pool: FeatureStats | None = None
        spatial: FeatureStats | None = None
        index: list[np.ndarray] = []
        pools: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        grid: dict[int, bytes] = {}
        sample_seconds = 0.0
        for b in executor.map_actors(
                _SampleActor, (plan,), make_ds=lambda: _shards_ds(shards),
                local_batches=lambda: (pa.Table.from_pylist([s]) for s in shards),
                batch_size=1, resources=self.ctx.resources, num_batches=len(shards)):
            if not b.num_rows:
                continue
            x = _unpack(b["pool"]).astype(np.float64)
            pool = pool or FeatureStats(x.shape[1], ext_name)
            pool.update(x)
            if b["spatial"][0].as_py():
                s = _unpack(b["spatial"]).astype(np.float64)
                spatial = spatial or FeatureStats(s.shape[1], ext_name, "spatial")
                spatial.update(s)
            index.append(b["index"].to_numpy())
            sample_seconds += float(np.sum(b["seconds"].to_numpy()))
            pools.append(x.astype(np.float32))
            if b["logits"][0].as_py():
                logits.append(_unpack(b["logits"]))
            tokens.extend(np.frombuffer(t, dtype="<i4") for t in b["tokens"].to_pylist() if t)
            for i, png in zip(b["index"].to_pylist(), b["png"].to_pylist()):
                if png:
                    grid[i] = png
        if pool is None:
            raise StageError(f"{where}: the sampling actors returned no samples")
        order = np.argsort(np.concatenate(index), kind="stable")
        pool_ND = np.concatenate(pools)[order]
        logits_NK = np.concatenate(logits)[order] if logits else None
        metrics, notes = generation_metrics(ref, pool, spatial, pool_ND, logits_NK, k=cfg.pr_k,
                                            is_splits=cfg.is_splits)
        # the generator's sampling time per image (actor time, decode and features excluded):
        # two evaluations of one generator, e.g. sampler {attention: grat} vs dense, compare it
        metrics["sample_seconds_per_image"] = sample_seconds / max(1, len(pool_ND))
        if tokens:
            size = int(facts.get("codebook_size") or 0)
            usage = codebook_usage(torch.from_numpy(np.concatenate(tokens).astype(np.int64)), size)
            metrics["codebook_usage"] = float(usage["usage_fraction"])

        lineage = self._lineage(gen_ref, up, tok, tok_family, side, source)
        details = {"reference": ref.describe(), "lineage": lineage, "family": family,
                   "sampler": sampler, "sampler_released_size": released,
                   "seed": cfg.seed, "shard_size": cfg.shard_size,
                   "notes": notes}
        if grid:
            from vgen_core.data.sample_images import decode_png

            imgs = np.stack([decode_png(grid[i]) for i in sorted(grid)])
            tracker.log_image("samples_grid", image_grid(imgs, nrow=8))
        tracker.log_dict(details, "evaluation.json")
        tracker.set_tags({
            "vgen.eval.extractor": ext_name,
            "vgen.eval.comparable_to_published": str(ref.comparable).lower(),
            "vgen.eval.reference": (f"{ref.key.source_uri}@v{ref.key.source_version}"
                                    if ref.key.source_version >= 0 else ref.key.source_uri),
            "vgen.eval.reference_cached": str(ref.cached).lower(),
            **{f"vgen.lineage.{k}": v for k, v in _flat(lineage).items()},
        })
        if gen_ref.digest:  # the registry shows each generator version with its scores
            from vgen_core.tracking import tag_model_versions

            stage = self.ctx.stage
            tag_model_versions(tracker, gen_ref.digest, {
                **{f"eval.{stage}.{k}": f"{v:.6g}" for k, v in metrics.items()},
                f"eval.{stage}.extractor": ext_name, f"eval.{stage}.num_samples": n,
                f"eval.{stage}.run_id": tracker.run_id or ""})
        return self._write_results(metrics, n, ext_name, details)

    # -- pieces of the run ----------------------------------------------------------------
    def _check_sampler(self, spec: families.FamilySpec) -> None:
        params = inspect.signature(spec.hook("sampler")).parameters
        allowed = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p != "generator"]
        bad = sorted(set(self.config.sampler) - set(allowed))
        if bad:
            raise StageError(f"{self._where()}: with.sampler has {bad}, which the {spec.name} "
                             f"sampler does not take; it takes {', '.join(allowed)}")

    def sampler_options(self, spec: families.FamilySpec,
                        gen_cfg: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """(released size, sampler keyword arguments): the family's released inference
        settings for the generator's size (``FamilySpec.sampling``; the size whose registered
        config equals the export's), with ``with.sampler`` on top. A generator of no released
        size samples with ``with.sampler`` and the sampler's own defaults."""
        size = released_size(spec, gen_cfg)
        base = dict(spec.sampling.get(size, {})) if size is not None else {}
        return (size if base else None), {**base, **self.config.sampler}

    def _check_fits(self, gen_cfg: dict, facts: dict, gen_ref: OutputRef, side: OutputRef) -> None:
        for key in ("codebook_size", "seq_len", "token_bits", "in_channels"):
            if key in gen_cfg and key in facts and int(gen_cfg[key]) != int(facts[key]):
                raise StageError(f"{self._where()}: the generator {gen_ref.uri} has {key}="
                                 f"{gen_cfg[key]} but the tokens {side.uri} have {facts[key]}; "
                                 "list the tokenize stage the generator was trained on in needs")

    def _shards(self, spec: families.FamilySpec, gen_cfg: dict, side: OutputRef,
                source: OutputRef) -> tuple[int, list[dict[str, Any]]]:
        cfg = self.config
        n = cfg.num_samples
        labels: list[int] | None = None
        captions: list[str] | None = None
        if spec.conditioning == "labels":
            classes = int(gen_cfg.get("num_classes") or 1)
            if cfg.per_class is not None:
                n = cfg.per_class * classes
                if "num_samples" in cfg.model_fields_set and cfg.num_samples != n:
                    raise StageError(f"{self._where()}: num_samples {cfg.num_samples} != per_class "
                                     f"{cfg.per_class} x {classes} classes; set one of them")
            labels = (np.arange(n) % classes).tolist()
        else:
            captions = self._captions(side, source, n)
        shards = []
        for i, start in enumerate(range(0, n, cfg.shard_size)):
            stop = min(n, start + cfg.shard_size)
            shards.append({"shard": i, "start": start,
                           "labels": labels[start:stop] if labels is not None else None,
                           "captions": captions[start:stop] if captions is not None else None})
        return n, shards

    def _captions(self, side: OutputRef, source: OutputRef, n: int) -> list[str]:
        from .base import filter_to_keys

        store = self.ctx.store
        if "caption" not in store.schema(side.name).names:
            raise StageError(f"{self._where()}: a text-conditioned generator needs captions, but "
                             f"{side.uri} has no caption column")
        t = store.read(side.name, version=side.version,
                       columns=["sample_id", "content_digest", "fingerprint", "caption"])
        t = t.filter(pc.equal(t["fingerprint"], side.digest))
        keys = store.read(source.name, version=source.version,
                          columns=["sample_id", "content_digest"])
        rows = sorted((r["sample_id"], r["caption"]) for r in filter_to_keys(t, keys).to_pylist()
                      if r["caption"])
        if not rows:
            raise StageError(f"{self._where()}: no captions in the current rows of {side.uri}")
        return [rows[i % len(rows)][1] for i in range(n)]

    def reference(self, executor: Any, ext: dict[str, Any], resolution: int,
                  source: OutputRef):
        """Cached reference statistics, computed (and cached) on a miss."""
        from vgen_core.eval.reference import ReferenceKey, ReferenceStatsCache, keys_digest

        store, cfg, name = self.ctx.store, self.config, self.extractor_name()
        cache = ReferenceStatsCache(store)
        if cfg.reference_npz:
            ident = _file_identity(cfg.reference_npz)
            key = ReferenceKey(cfg.reference_npz, -1, name, 0)
            hit = cache.get(key, ident)
            if hit is not None:
                return hit
            ref = self._import_npz(ext, ident)
            cache.put(ref)
            return ref
        keys = store.read(source.name, version=source.version,
                          columns=["sample_id", "content_digest"])
        digest = keys_digest(keys)
        assert source.version is not None  # a table reference always has its version
        key = ReferenceKey(source.uri, int(source.version), name, int(resolution))
        hit = cache.get(key, digest)
        if hit is not None:
            return hit
        ref = self._extract_reference(executor, key, ext, source, digest, keys.num_rows)
        cache.put(ref)
        return ref

    def _import_npz(self, ext: dict[str, Any], ident: str):
        from vgen_core.eval.reference import import_adm_npz

        npz = self.config.reference_npz
        if not npz:
            raise StageError(f"{self._where()}: with.reference_npz is not set")
        with tempfile.TemporaryDirectory() as tmp:
            path = fetch_file(npz, tmp)
            extractor = build_extractor(ext, tmp, _device(self.config.device))
            try:
                return import_adm_npz(path, extractor, source_uri=self.config.reference_npz,
                                      source_digest=ident,
                                      max_features=self.config.reference_features)
            except ValueError as e:
                raise StageError(f"{self._where()}: {e}") from None

    def _extract_reference(self, executor: Any, key: Any, ext: dict[str, Any],
                           source: OutputRef, digest: str, rows: int):
        from vgen_core.eval.fid import FeatureStats
        from vgen_core.eval.reference import FeatureSubset, ReferenceStats

        store = self.ctx.store
        col = pick_column(store.schema(source.name).names, IMAGE_COLUMNS)
        if col is None:
            raise StageError(f"{self._where()}: {source.uri} has no image column "
                             f"({', '.join(IMAGE_COLUMNS)}) for reference statistics")
        cols = ["sample_id", col]
        bs = int(getattr(self.ctx.resources, "batch_size", 16) or 16)

        def make_ds():
            import ray.data

            return ray.data.read_delta(source.uri, version=source.version, columns=cols,
                                       storage_options=store.worker_storage_options() or None)

        def local():
            t = store.read(source.name, version=source.version, columns=cols)
            for rb in t.to_batches(max_chunksize=bs):
                yield pa.Table.from_batches([rb])

        pool = spatial = None
        subset = FeatureSubset(self.config.reference_features)
        args = (ext, key.resolution, col, self.config.device)
        for b in executor.map_actors(_ReferenceActor, args, make_ds=make_ds, local_batches=local,
                                     batch_size=bs, resources=self.ctx.resources,
                                     num_batches=-(-rows // bs)):
            if not b.num_rows:
                continue
            x = _unpack(b["pool"]).astype(np.float64)
            pool = pool or FeatureStats(x.shape[1], key.extractor)
            pool.update(x)
            if b["spatial"][0].as_py():
                s = _unpack(b["spatial"]).astype(np.float64)
                spatial = spatial or FeatureStats(s.shape[1], key.extractor, "spatial")
                spatial.update(s)
            subset.add(b["sample_id"].to_pylist(), x)
        if pool is None or (pool.count or 0) < 2:
            raise StageError(f"{self._where()}: {source.uri}@v{source.version} has fewer than 2 "
                             "images; reference statistics need at least 2")
        return ReferenceStats(key, "delta", pool, spatial, subset.result(), digest, False,
                              {"preprocess": {"crop": "center", "resize": "bicubic",
                                              "resolution": key.resolution}})

    def _lineage(self, gen_ref: OutputRef, up: str, tok: OutputRef, tok_family: str,
                 side: OutputRef, source: OutputRef) -> dict[str, Any]:
        gen_stage = next((u for u, r in self._refs("generator") if r == gen_ref), None)
        return {"generator": {"stage": gen_stage, "uri": gen_ref.uri, "digest": gen_ref.digest},
                "tokenizer": {"stage": up, "family": tok_family, "uri": tok.uri,
                              "digest": tok.digest, "fingerprint": side.digest},
                "tokens": {"uri": side.uri, "version": side.version},
                "curated": {"uri": source.uri, "version": source.version}}

    def _write_results(self, metrics: dict[str, float], n: int, ext_name: str,
                       details: dict[str, Any]) -> StageResult:
        store = self.ctx.store
        now = dt.datetime.now(dt.timezone.utc)
        ref_json = json.dumps({"reference": details["reference"], "lineage": details["lineage"],
                               "sampler": details["sampler"], "seed": details["seed"]},
                              sort_keys=True, default=str)
        rows = [{"stage": self.ctx.stage, "fingerprint": self.ctx.row_fingerprint, "metric": k,
                 "value": float(v), "num_samples": n,
                 "extractor": (None if k in ("codebook_usage", "sample_seconds_per_image")
                               else ext_name),
                 "details": ref_json, "recorded_at": now} for k, v in metrics.items()]
        name = self.table_name()
        version = store.append(name, pa.Table.from_pylist(rows, schema=EVAL_RESULTS),
                               commit_metadata={"vgen.stage": self.ctx.stage,
                                                "vgen.fingerprint": self.ctx.row_fingerprint})
        return StageResult(outputs={"results": OutputRef("table", name, store.uri(name),
                                                         version=version)},
                           metrics=dict(metrics))


def _shards_ds(shards: list[dict[str, Any]]):
    import ray.data

    return ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))


def released_size(spec: families.FamilySpec, gen_cfg: dict[str, Any]) -> str | None:
    """The registered size of ``spec`` whose config equals an export's ``config.json``."""
    from vgen_core.tokenizers.io import _RESERVED_KEYS
    from vgen_core.weights import named_size

    fields = {k: v for k, v in gen_cfg.items() if k not in _RESERVED_KEYS}
    try:
        have = spec.config_class.model_validate(fields).model_dump(mode="json")
    except ValueError:
        return None
    return named_size(spec, have)


def _model_config(uri: str) -> dict[str, Any]:
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    try:
        return json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
    except FileNotFoundError:
        raise StageError(f"no exported model at {uri} (config.json missing); re-run the "
                         "train.generator stage") from None


def _grid_hw(store: Any, side: OutputRef) -> list[int] | None:
    names = store.schema(side.name).names
    if "grid_h" not in names:
        return None
    t = store.read(side.name, version=side.version, columns=["grid_h", "grid_w", "fingerprint"])
    t = t.filter(pc.equal(t["fingerprint"], side.digest))
    return [int(t["grid_h"][0].as_py()), int(t["grid_w"][0].as_py())] if t.num_rows else None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = str(v)
    return out
