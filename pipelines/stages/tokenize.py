"""Pre-tokenization stages: curated images -> token side tables.

Kinds (one class each, sharing :class:`ImageTokenizeStage`):

* ``tokenize.lfq``   MaskBit LFQ bit tokens      -> ``bit_tokens`` (ids int32 + packed bits)
* ``tokenize.fsq``   BAR binary-FSQ bit tokens   -> ``bit_tokens``
* ``tokenize.titok`` TiTok / TA-TiTok 1D VQ ids  -> ``id_tokens``
* ``cache.latents``  (``cache_latents.py``) KL-VAE / TiTok-KL posteriors -> ``latents``
* ``tokenize.deltatok`` (``deltatok.py``) ViCaS clips -> ``delta_tokens``

Which tokenizer families a kind takes is the families' business: a kind writes one side-table
kind (``produces``) and takes every tokenizer :class:`~vgen_core.families.FamilySpec` that can fill
it (its default: the family whose spec lists the kind in ``default_for``); encoding, the pixel
range and the native resolution come from the spec. The model comes from, in order: an upstream
``train.tokenizer`` stage (its exported safetensors, loaded once per actor), ``weights:`` (a
released checkpoint, local or s3://, loaded through the family's documented key map), or the
registry ``size`` built with ``init_seed`` (tests, demos).

**The tokenizer is an output.** Besides ``samples`` / ``quarantine`` / ``source``, the stage
outputs ``tokenizer``: a model reference (``save_pretrained`` directory + weights digest) to the
exact model that encoded the rows: the upstream ``train.tokenizer`` export passed through, or, for
a ``weights:`` file or a seeded build, that model exported once under
``models/<dag>/<stage>/<row fingerprint>/``. Whoever decodes these tokens (train / evaluate
stages) loads that reference, so the decoder cannot drift from the encoder. It is implied by the
row fingerprint, so it does not enter downstream fingerprints (``derived_outputs``).

The input is any curated table with image bytes: ``image_png`` (ingest.images)
or ``image`` (curate.pancap's original JPEG); ``label`` and ``caption``/``caption_text`` are
carried when present.

Preprocessing is declared and enters the row fingerprint with the weights digest and the kind
version: resize the shorter side to ``resolution`` (bicubic) and center-crop a square; with
``flip: true`` the horizontally flipped crop is encoded too and stored in its own column
(``indices_flip`` / ``moments_flip``), the baked augmentation a train stage may ask for. Each
fingerprint writes its own side table ``<dag>/<stage>/<fp16>`` keyed by (sample_id,
content_digest); a re-run computes only samples that are new, changed, or not in this table.
An undecodable image or a non-finite output is quarantined with the sample, column and reason.

**Encoding on a GPU** (the image kinds' :class:`ImageEncodeConfig`; the actor's work is
``vgen_core.tokenizers.device_encode.DeviceEncoder``): pinned-memory, non-blocking uploads on a
side stream overlapped with the encode of the previous chunk, the flip made on the GPU, channels-
last inputs, crops and flips in one forward, one synchronisation per batch.

* ``precision``: ``auto`` (default) encodes in bf16 autocast when the stage is placed on GPUs
  (``device: cuda``, or ``device: auto`` with ``resources.gpus > 0``) and in fp32 otherwise;
  ``fp32`` / ``bf16`` force one. bf16 changes the outputs (bits near 0 flip; the LFQ test measures
  5 of 768 bits on a tiny model), so a bf16 encode adds ``precision: bf16`` to the row fingerprint
  (a bf16 table is never mixed with fp32 rows) and to the table's ``vgen.preprocess`` record. An
  fp32 encode adds nothing: its fingerprint is the one fp32 tables always had.
* ``compile`` (default false): ``torch.compile`` of the encode, static shapes (CUDA; the CPU path
  stays eager).
* ``encode_batch``: model inputs per forward (crops + flips), ``auto`` = from GPU memory (the
  measured per-input footprint against the free memory; ``device_encode`` documents the rule),
  unset = each batch the executor hands over (``resources.batch_size`` rows x views) in one
  forward, as before. To feed a GPU, raise ``resources.batch_size`` and let ``auto`` split.

``compile`` and ``encode_batch`` change only float summation order (like the device, the thread
count or the batch size, which never entered it), so the three settings stay out of the config
the planner hashes (``exclude=True``) and the resolved precision enters through
:meth:`ImageTokenizeStage.row_fingerprint_parts`. On CPU the defaults encode exactly as before:
each view in one fp32, eager call.
"""

from __future__ import annotations

import json
import tempfile
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from vgen_core import families
from vgen_core.data.fsio import fetch_file, fetch_model_dir, file_digest, filesystem_for
from vgen_core.data.images import CAPTION_COLUMNS, IMAGE_COLUMNS, decode_image, pick_column, \
    preprocess
from vgen_core.data.schemas import BIT_TOKENS, ID_TOKENS

from .base import (BatchResult, MapStage, OutputRef, StageConfig, StageError, StageResult,
                   quarantine_record, resolve_device)

if TYPE_CHECKING:
    from vgen_core.tokenizers.device_encode import DeviceEncoder

__all__ = ["ImageEncodeConfig", "ImageTokenizeConfig", "ImageTokenizeStage", "TokenizeLFQ",
           "TokenizeFSQ", "TokenizeTiTok", "weights_file_digest"]


def weights_file_digest(uri: str, where: str) -> str:
    """Digest of a ``weights:`` file, or of an export folder's ``model.safetensors`` and
    ``manifest.json`` / ``config.json``; StageError naming the stage when it cannot be read."""
    from vgen_core.data.fsio import filesystem_for
    from vgen_core.weights import export_uri

    uri = export_uri(uri)  # an export's model.safetensors: the whole export (config, manifest)
    try:
        fs, path = filesystem_for(uri)
        if fs.isdir(path):
            parts = [file_digest(f"{uri.rstrip('/')}/model.safetensors", what="weights file")]
            for name in ("config.json", "manifest.json"):  # an export's; an HF snapshot's config
                if fs.exists(f"{path.rstrip('/')}/{name}"):
                    parts.append(file_digest(f"{uri.rstrip('/')}/{name}", what="weights file"))
            return "+".join(parts)
        return file_digest(uri, what="weights file")
    except FileNotFoundError as e:
        raise StageError(f"{where}: {e}; `weights:` must point to a released checkpoint "
                         "(.safetensors / .bin / .pt) or a `vgen weights convert` folder") from None


class ImageTokenizeConfig(StageConfig):
    model: str | None = Field(None, description="tokenizer family; default: the kind's own")
    size: str = Field("tiny", description="registry size (with no upstream tokenizer)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    weights: str | None = Field(None, description="released checkpoint (.safetensors, or .bin / "
                                ".pt read weights-only; local or s3://), loaded through the "
                                "family's key map; or a `vgen weights convert` / train export "
                                "folder (its manifest's pixel range must be the family's)")
    resolution: int | None = Field(None, ge=8, description="crop size; default: the model's")
    flip: bool = True
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")


class ImageEncodeConfig(ImageTokenizeConfig):
    """Config of the image kinds (``tokenize.lfq`` / ``fsq`` / ``titok``, ``cache.latents``): how
    the actor encodes (module docstring, "Encoding on a GPU"). Not in the hashed config: the
    resolved precision enters the row fingerprint itself; the rest changes no result."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", exclude=True, description="auto: bf16 autocast when placed on GPUs, else fp32")
    compile: bool = Field(False, exclude=True, description="torch.compile the encode")
    encode_batch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, exclude=True, description="model inputs per forward; auto: from GPU memory; "
                                        "unset: the whole batch")


class ImageTokenizeStage(MapStage):
    """Base of the image tokenize kinds: model loading, decoding, preprocessing, views, and the
    ``tokenizer`` output (see the module docstring)."""

    Config: ClassVar[type[StageConfig]] = ImageEncodeConfig
    write_mode = "append"
    needs_range = (1, 2)
    weights_fields: ClassVar[tuple[str, ...]] = ("weights",)  # checked before anything runs
    #: the side-table kind this stage writes (tokenizer families that can fill it are taken)
    produces: ClassVar[str]
    #: outputs every completed run records (an older record without one is re-run)
    required_outputs: ClassVar[tuple[str, ...]] = ("samples", "quarantine", "source", "tokenizer")
    #: outputs implied by the row fingerprint: they do not enter downstream fingerprints
    derived_outputs: ClassVar[tuple[str, ...]] = ("tokenizer",)
    config: ImageTokenizeConfig

    # -- the family -----------------------------------------------------------------------
    @property
    def family_name(self) -> str:
        name = self.config.model or families.default_for(self.kind)
        spec = families.find(name)
        if spec is None or spec.role != "tokenizer" or self.produces not in spec.produces:
            raise StageError(f"stage '{self.ctx.stage}': `{self.kind}` takes model "
                             f"{' | '.join(self.accepted_families())}, got {name!r}")
        return spec.name

    @classmethod
    def accepted_families(cls) -> list[str]:
        return [s.name for s in families.all_specs("tokenizer") if cls.produces in s.produces]

    @property
    def spec(self) -> families.FamilySpec:
        return families.get(self.family_name)

    @property
    def pixel_range(self) -> str:
        return families.pixel_range_of(self.spec)

    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    def tokenizer_ref(self) -> OutputRef | None:
        """The upstream ``train.tokenizer`` export, when this stage has one among its needs."""
        refs = [o["tokenizer"] for o in self.ctx.inputs.values()
                if "tokenizer" in o and "samples" not in o]
        return refs[0] if refs else None

    def model_config(self) -> Any:
        return self.spec.config(self.config.size, **self.config.overrides)

    def weights_target(self) -> tuple[str, Any, str | None] | None:
        return self.spec.name, self.model_config(), self.pixel_range

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """The tokenizer's weights and the pixel range it is fed (the family's: a change of it,
        e.g. LFQ's move to MaskBit's [0, 1], recomputes the tokens of unchanged weights), and
        ``precision: bf16`` when the rows are encoded in bf16 (fp32 adds nothing)."""
        ref = self.tokenizer_ref()
        if ref is not None:
            parts = {"weights": ref.digest, "pixel_range": self.pixel_range}
        elif self.config.weights:
            parts = {"weights_file": weights_file_digest(self.config.weights, self._where()),
                     "pixel_range": self.pixel_range}
        else:
            from vgen_core.tokenizers.io import weights_digest

            parts = {"weights": weights_digest(self._build_seeded()),
                     "pixel_range": self.pixel_range}
        if self.encode_precision() == "bf16":
            parts["precision"] = "bf16"
        return parts

    def _gpus(self) -> float:
        return float(getattr(self.ctx.resources, "gpus", 0.0) or 0.0)

    def encode_precision(self) -> Literal["fp32", "bf16"]:
        """``fp32`` or ``bf16``: what the rows are encoded in, decided from the config and the
        declared resources alone, so the driver (fingerprint) and the actors (encode) agree.
        ``auto`` is bf16 when the stage is placed on GPUs (``device: cuda``, or ``device: auto``
        with ``resources.gpus > 0``). A config without the field (``tokenize.deltatok``) is fp32.
        """
        want = getattr(self.config, "precision", "fp32")
        if want in ("fp32", "bf16"):
            return "bf16" if want == "bf16" else "fp32"
        on_gpu = self.config.device == "cuda" or (self.config.device == "auto"
                                                 and self._gpus() > 0)
        return "bf16" if on_gpu else "fp32"

    def _build_seeded(self):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.init_seed)
            return self.spec.build_config(self.model_config()).eval()

    def load_model(self):
        """The tokenizer, on CPU, in eval mode (upstream export > weights file > seeded)."""
        from vgen_core.tokenizers.io import load_pretrained

        ref = self.tokenizer_ref()
        self._tmp = tempfile.TemporaryDirectory()
        if ref is not None:
            model = load_pretrained(fetch_model_dir(ref.uri, self._tmp.name))
            if model.family not in self.accepted_families():
                raise StageError(f"{self._where()}: upstream tokenizer {ref.uri} is a "
                                 f"'{model.family}' model; `{self.kind}` takes "
                                 f"{' | '.join(self.accepted_families())}")
            return model.eval()
        if self.config.weights:
            return self.load_weights_file()
        return self._build_seeded()

    def load_weights_file(self):
        """The ``weights:`` model: a released checkpoint through the family's mapping (as
        ``vgen weights convert``) or an export folder whose manifest's pixel range is the
        family's (the one this stage feeds)."""
        from vgen_core.data.fsio import filesystem_for
        from vgen_core.weights import WeightsError, load_weights

        from vgen_core.weights import export_uri

        spec, uri = self.spec, self.config.weights
        assert uri is not None
        uri = export_uri(uri)
        fs, path = filesystem_for(uri)
        local = (fetch_model_dir(uri, f"{self._tmp.name}/weights") if fs.isdir(path)
                 else fetch_file(uri, self._tmp.name))
        try:
            return load_weights(local, spec.name, self.model_config(),
                                pixel_range=self.pixel_range,
                                what=f"{self._where()} with.weights {uri}")
        except WeightsError as e:
            raise StageError(str(e)) from None

    def check_model(self, model) -> None:
        """Refuse a model whose ``encode`` fills another side-table kind than this stage's."""
        made = families.get(model.family).produces_kind(model.config)
        if made != self.produces:
            kinds = [k for k, c in _KIND_OF.items() if c == made]
            raise StageError(f"{self._where()}: this {model.family} model makes {made} "
                             f"(config {_mode(model.config)}); `{self.kind}` writes "
                             f"{self.produces}: use {' | '.join(kinds) or 'another stage kind'}, "
                             "or pick a size/config that makes " + self.produces)

    def setup(self) -> None:
        self.device = resolve_device(self.config.device)
        model = self.load_model()
        self.check_model(model)
        spec = families.get(model.family)
        native = spec.native_resolution(model.config)
        res = self.config.resolution or native
        if res is None:
            raise StageError(f"{self._where()}: set with.resolution (the model has no fixed "
                             "image size)")
        if native is not None and res != native:
            raise StageError(f"{self._where()}: with.resolution={res} but the {model.family} "
                             f"tokenizer encodes {native}x{native} images; set resolution: "
                             f"{native} or use a model of that size")
        factor = getattr(model.config, "downsample_factor", None)
        if factor and res % int(factor):
            raise StageError(f"{self._where()}: resolution {res} is not a multiple of the "
                             f"{model.family} tokenizer's downsample factor {factor}")
        self.resolution = res
        self.model = model.to(self.device).eval()
        self.encode_fn = spec.hook("encode")

    def declared_resolution(self) -> int | None:
        """The crop size rows are made at, known on the driver (config, else the model's)."""
        if self.config.resolution:
            return self.config.resolution
        ref = self.tokenizer_ref()
        if ref is not None:
            from vgen_core.tokenizers.io import read_config

            spec, config = read_config(ref.uri)
            return spec.native_resolution(config)
        return self.spec.native_resolution(self.model_config())

    # -- the tokenizer as an output -------------------------------------------------------
    def export_tokenizer(self) -> OutputRef:
        """The reference to the model that encodes these rows: the upstream export, or this
        stage's own export of its ``weights:`` file / seeded build (written once per row
        fingerprint, on the driver)."""
        ref = self.tokenizer_ref()
        if ref is not None:
            return ref
        from vgen_core.tokenizers.io import CONFIG_NAME, save_pretrained, weights_digest

        name = f"models/{self.ctx.dag}/{self.ctx.stage}/{self.ctx.row_fingerprint}"
        uri = self.ctx.store.path(name)
        fs, path = filesystem_for(uri)
        config_path = f"{path.rstrip('/')}/{CONFIG_NAME}"
        if fs.exists(config_path):
            digest = json.loads(fs.cat_file(config_path)).get("weights_digest")
            if digest:
                return OutputRef("model", name, uri, digest=digest)
        model = self.load_model()
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            fs.makedirs(path, exist_ok=True)
            import os

            # weights first: a reader only trusts a directory with its config.json
            for fname in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME):
                fs.put(os.path.join(tmp, fname), f"{path.rstrip('/')}/{fname}")
        return OutputRef("model", name, uri, digest=weights_digest(model))

    def run(self, executor: Any = None) -> StageResult:
        tokenizer = self.export_tokenizer()
        result = super().run(executor)
        result.outputs["tokenizer"] = tokenizer
        return result

    def commit_metadata(self) -> dict[str, str]:
        import json

        pre = {"kind": self.kind, "family": self.family_name,
               "resolution": self.declared_resolution(), "crop": "center", "resize": "bicubic",
               "baked": ["hflip"] if self.config.flip else [], "pixel_range": self.pixel_range}
        if self.encode_precision() == "bf16":
            pre["precision"] = "bf16"
        return {"vgen.preprocess": json.dumps(pre, sort_keys=True)}

    # -- data -----------------------------------------------------------------------------
    def input_columns(self) -> list[str] | None:
        ref = self.samples_input()
        names = self.ctx.store.schema(ref.name).names
        image = pick_column(names, IMAGE_COLUMNS)
        if image is None:
            raise StageError(f"stage '{self.ctx.stage}': upstream table {ref.uri} has no image "
                             f"column (expected one of {', '.join(IMAGE_COLUMNS)}); its columns "
                             f"are {', '.join(names)}")
        extra = [c for c in ("label", "source", pick_column(names, CAPTION_COLUMNS))
                 if c and c in names]
        return ["sample_id", "content_digest", image, *extra]

    # -- decode: ahead of the actor (``prepare_batch``) on Ray, inline in process ------------
    def prepare_args(self) -> dict[str, Any] | None:
        res = self.declared_resolution()
        return None if res is None else {"resolution": int(res)}

    def prepare_batch(self, batch: pa.Table, **kwargs: Any) -> pa.Table:
        """Decode + preprocess on a CPU task (no model): the image column becomes ``_pixels``
        (``resolution``² × 3 uint8 bytes, null where it failed) and ``_error`` (why).
        ``kwargs``: :meth:`prepare_args`."""
        resolution = int(kwargs["resolution"])
        col = self._image_column(batch)
        pixels: list[bytes | None] = []
        errors: list[str | None] = []
        for data in batch[col].to_pylist():
            try:
                pixels.append(preprocess(decode_image(data), resolution).tobytes())
                errors.append(None)
            except ValueError as e:
                pixels.append(None)
                errors.append(f"column '{col}': {e}")
            except Exception as e:
                pixels.append(None)
                errors.append(f"column '{col}': {type(e).__name__}: {e}")
        return (batch.drop_columns([col])
                .append_column("_pixels", pa.array(pixels, pa.binary()))
                .append_column("_error", pa.array(errors, pa.string()))
                .append_column("_resolution", pa.array([resolution] * batch.num_rows, pa.int32())))

    def _image_column(self, batch: pa.Table) -> str:
        col = pick_column(batch.schema.names, IMAGE_COLUMNS)
        if col is None:
            raise StageError(f"stage '{self.ctx.stage}': batch has no image column "
                             f"({', '.join(IMAGE_COLUMNS)})")
        return col

    def decode_batch(self, batch: pa.Table) -> tuple[list[int], np.ndarray | None, list[dict]]:
        """Decode + preprocess every row (or take the pixels ``prepare_batch`` made); returns
        (kept row indices, (n, R, R, 3) uint8, quarantine records for the rest). When every row
        decoded, the pixels are a view of the Arrow column's buffer (no per-row copies)."""
        names = batch.schema.names
        if "_pixels" not in names:
            batch = self.prepare_batch(batch, resolution=self.resolution)
        else:
            made = set(batch["_resolution"].to_pylist())
            if made - {self.resolution}:
                raise StageError(f"stage '{self.ctx.stage}': images were prepared at {made} px "
                                 f"but the model encodes {self.resolution} px; set "
                                 f"with.resolution: {self.resolution}")
        r = self.resolution
        if batch["_error"].null_count == batch.num_rows:  # every row decoded: no copy
            block = _pixel_block(batch["_pixels"], r)
            if block is not None:
                return list(range(batch.num_rows)), block, []
        ids = batch["sample_id"].to_pylist()
        digests = batch["content_digest"].to_pylist()
        sources = batch["source"].to_pylist() if "source" in names else [None] * len(ids)
        keep, images, quarantine = [], [], []
        for i, (data, err) in enumerate(zip(batch["_pixels"].to_pylist(),
                                            batch["_error"].to_pylist())):
            if err is None:
                images.append(np.frombuffer(data, np.uint8).reshape(r, r, 3))
                keep.append(i)
            else:
                quarantine.append(quarantine_record(
                    ids[i], "decode", f"stage '{self.ctx.stage}', {err}. "
                    "Expected PNG/JPEG bytes of an RGB image; re-curate the sample or fix its "
                    "source file", content_digest=digests[i], source=sources[i]))
        return keep, (np.stack(images) if images else None), quarantine

    def to_model(self, images_BHWC):
        """uint8 (B, H, W, 3) tensor -> float (B, 3, H, W) in the family's pixel range."""
        return families.to_model_pixels(images_BHWC, self.pixel_range)

    def common_columns(self, batch: pa.Table) -> dict[str, Any]:
        n, names = batch.num_rows, batch.schema.names
        cap = pick_column(names, CAPTION_COLUMNS)
        return {
            "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
            "fingerprint": [self.ctx.row_fingerprint] * n,
            "label": batch["label"] if "label" in names else [-1] * n,
            "caption": batch[cap] if cap else [None] * n,
        }

    def process_batch(self, batch: pa.Table) -> BatchResult:
        keep, images, quarantine = self.decode_batch(batch)
        if images is None:
            return BatchResult(self.output_schema.empty_table(), quarantine)
        batch = batch.take(keep)
        outs = self.device_encoder().encode_views(images, self.config.flip)
        rows, more_q = self.make_rows(batch, outs[0], outs[1] if self.config.flip else None)
        return BatchResult(rows, quarantine + more_q)

    def device_encoder(self) -> DeviceEncoder:
        """The actor's :class:`~vgen_core.tokenizers.device_encode.DeviceEncoder` (after
        ``setup``; built on first use, once per actor)."""
        enc = getattr(self, "_device_encoder", None)
        if enc is None:
            from vgen_core.tokenizers.device_encode import DeviceEncoder

            gpus = self._gpus()
            enc = DeviceEncoder(self.model, self.encode_fn, self.pixel_range, self.device,
                                precision=self.encode_precision(),
                                compile=bool(getattr(self.config, "compile", False)),
                                micro_batch=getattr(self.config, "encode_batch", None),
                                gpu_share=gpus if 0 < gpus < 1 else 1.0,
                                cpu_encode=self.encode)
            self._device_encoder = enc
        return enc

    def encode(self, x_BCHW) -> dict[str, np.ndarray]:
        """The family's ``encode`` (see :class:`~vgen_core.families.FamilySpec`), as numpy: the
        CPU path's encode (a GPU actor calls the hook itself, asynchronously)."""
        return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                for k, v in self.encode_fn(self.model, x_BCHW).items()}

    # -- per kind -------------------------------------------------------------------------
    def make_rows(self, batch: pa.Table, out: dict[str, np.ndarray],
                  out_flip: dict[str, np.ndarray] | None) -> tuple[pa.Table, list[dict]]:
        raise NotImplementedError  # pragma: no cover - abstract


class _BitTokens(ImageTokenizeStage):
    output_schema = BIT_TOKENS

    def make_rows(self, batch, out, out_flip):
        from vgen_core.tokenizers.lfq import pack_bits

        bits, idx = out["bits"], out["indices"]
        B, h, w, K = bits.shape
        rows = {
            **self.common_columns(batch),
            "grid_h": [h] * B, "grid_w": [w] * B, "token_bits": [K] * B,
            "indices": [r for r in idx.reshape(B, -1).astype(np.int32)],
            "bits_packed": [pack_bits(bits[i].reshape(-1, K)).tobytes() for i in range(B)],
            "indices_flip": ([r for r in out_flip["indices"].reshape(B, -1).astype(np.int32)]
                             if out_flip is not None else [None] * B),
        }
        return pa.table(rows, schema=BIT_TOKENS), []


class TokenizeLFQ(_BitTokens):
    """Bit tokens of a conv tokenizer (MaskBit LFQ: sign bits per grid position; index = sum
    bit_k 2^k)."""

    kind = "tokenize.lfq"
    version = 3
    produces = "bit_tokens"


class TokenizeFSQ(_BitTokens):
    """Bit tokens of a ViT tokenizer (BAR binary FSQ: one K-bit token per patch, raster order)."""

    kind = "tokenize.fsq"
    version = 2
    produces = "bit_tokens"


class TokenizeTiTok(ImageTokenizeStage):
    """1D token ids (TiTok / TA-TiTok VQ: K ids per image; text is only used at de-tokenization)."""

    kind = "tokenize.titok"
    version = 1
    produces = "id_tokens"
    output_schema = ID_TOKENS

    def make_rows(self, batch, out, out_flip):
        idx = out["indices"].astype(np.int32)
        B, K = idx.shape
        rows = {
            **self.common_columns(batch),
            "num_tokens": [K] * B, "codebook_size": [self.model.config.codebook_size] * B,
            "indices": list(idx),
            "indices_flip": (list(out_flip["indices"].astype(np.int32)) if out_flip is not None
                             else [None] * B),
        }
        return pa.table(rows, schema=ID_TOKENS), []


def _pixel_block(col: pa.ChunkedArray | pa.Array, r: int) -> np.ndarray | None:
    """(n, r, r, 3) uint8 view (read-only when the buffer is) of a binary column of n pixel blobs
    of r*r*3 bytes each, without copying them; None when a value is null or of another size."""
    if isinstance(col, pa.ChunkedArray):  # one chunk: itself; several: one concatenation
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    large = pa.types.is_large_binary(arr.type)
    if not len(arr) or arr.null_count or not (large or pa.types.is_binary(arr.type)):
        return None
    offsets = np.frombuffer(arr.buffers()[1], np.int64 if large else np.int32)
    offsets = offsets[arr.offset:arr.offset + len(arr) + 1]
    if not (np.diff(offsets) == r * r * 3).all():
        return None
    data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    return data.reshape(len(arr), r, r, 3)


#: the stage kind that writes each side-table kind (for error messages)
_KIND_OF = {"tokenize.lfq": "bit_tokens", "tokenize.fsq": "bit_tokens",
            "tokenize.titok": "id_tokens", "cache.latents": "latents",
            "tokenize.deltatok": "delta_tokens"}


def _mode(config: Any) -> str:
    fields = [f"{k}={getattr(config, k)}" for k in ("quantize_mode",) if hasattr(config, k)]
    return ", ".join(fields) or type(config).__name__
