"""Pre-tokenization stages: curated images -> token side tables.

Kinds (one class each, sharing :class:`ImageTokenizeStage`):

* ``tokenize.lfq``   MaskBit LFQ bit tokens      -> ``bit_tokens`` (ids int32 + packed bits)
* ``tokenize.fsq``   BAR binary-FSQ bit tokens   -> ``bit_tokens``
* ``tokenize.titok`` TiTok / TA-TiTok 1D VQ ids  -> ``id_tokens``
* ``cache.latents``  (``cache_latents.py``) KL-VAE / TiTok-KL posteriors -> ``latents``
* ``tokenize.deltatok`` (``deltatok.py``) ViCaS clips -> ``delta_tokens``

The model comes from, in order: an upstream ``train.tokenizer`` stage (its exported
safetensors, loaded once per actor), ``weights:`` (a released checkpoint, local or s3://, loaded
through the family's documented key map), or the registry ``size`` built with ``init_seed``
(tests, demos). The input is any curated table with image bytes: ``image_png`` (ingest.images)
or ``image`` (curate.pancap's original JPEG); ``label`` and ``caption``/``caption_text`` are
carried when present.

Preprocessing is declared and enters the row fingerprint with the weights digest and the kind
version: resize the shorter side to ``resolution`` (bicubic) and center-crop a square; with
``flip: true`` the horizontally flipped crop is encoded too and stored in its own column
(``indices_flip`` / ``moments_flip``), the baked augmentation a train stage may ask for. Each
fingerprint writes its own side table ``<dag>/<stage>/<fp16>`` keyed by (sample_id,
content_digest); a re-run computes only samples that are new, changed, or not in this table.
An undecodable image or a non-finite output is quarantined with the sample, column and reason.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from vgen_core.data.schemas import BIT_TOKENS, ID_TOKENS

from .base import (BatchResult, MapStage, OutputRef, StageConfig, StageError, quarantine_record,
                   resolve_device)

__all__ = ["ImageTokenizeConfig", "ImageTokenizeStage", "TokenizeLFQ", "TokenizeFSQ",
           "TokenizeTiTok", "fetch_model_dir", "preprocess", "decode_image", "FAMILIES"]


# ---------------------------------------------------------------------------------------------
# Model families a tokenize stage can load
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str  # vgen_core.tokenizers.io family
    config: Callable[..., Any]  # (size, **overrides) -> pydantic config
    official: Callable[[str, Any], Any]  # (safetensors path, config) -> model (key-mapped)


def _families() -> dict[str, Family]:
    from vgen_core.tokenizers import deltatok, fsq, kl_vae, lfq, maskbit_keys, titok

    return {
        "lfq": Family("lfq", lfq.lfq_config, maskbit_keys.load_official_maskbit),
        "bar_fsq": Family("bar_fsq", fsq.bar_fsq_config, fsq.load_official_bar_fsq),
        "titok": Family("titok", titok.titok_config, titok.load_official),
        "tatitok": Family("tatitok", titok.titok_config, titok.load_official),
        "kl_vae": Family("kl_vae", kl_vae.kl_vae_config, kl_vae.load_official),
        "deltatok": Family("deltatok", deltatok.deltatok_config, deltatok.load_deltatok),
    }


FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    if not FAMILIES:
        FAMILIES.update(_families())
    if name not in FAMILIES:
        raise ValueError(f"tokenizer family {name!r} not found; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def fetch_model_dir(uri: str, dest: str) -> str:
    """Copy a model directory (local or s3://) to ``dest``; returns the local path."""
    from fsspec.implementations.local import LocalFileSystem

    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def fetch_file(uri: str, dest_dir: str) -> str:
    """A local path for ``uri`` (copied into ``dest_dir`` when remote)."""
    from fsspec.implementations.local import LocalFileSystem

    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    local = f"{dest_dir}/{path.rsplit('/', 1)[-1]}"
    fs.get(path, local)
    return local


def file_digest(uri: str) -> str:
    """blake2b-256 of a (local or remote) file's bytes, streamed."""
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    h = hashlib.blake2b(digest_size=32)
    try:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except FileNotFoundError:
        raise StageError(f"weights file {uri} not found; `weights:` must point to a released "
                         "checkpoint (.safetensors) readable from every node") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> RGB uint8 (H, W, 3). Raises ValueError saying what was found."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        head = bytes(data[:8]) if data else b""
        why = ("no image format recognises these bytes" if isinstance(e, UnidentifiedImageError)
               else str(e))  # PIL's own message names an in-memory object's address
        raise ValueError(f"cannot decode image ({len(data or b'')} bytes, starts {head!r}): {why}")


def preprocess(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (bicubic) and center-crop to a square."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if (h, w) != (resolution, resolution):
        s = resolution / min(h, w)
        im = Image.fromarray(rgb).resize((max(resolution, round(w * s)),
                                          max(resolution, round(h * s))), Image.BICUBIC)
        rgb = np.asarray(im)
        h, w = rgb.shape[:2]
        y0, x0 = (h - resolution) // 2, (w - resolution) // 2
        rgb = rgb[y0:y0 + resolution, x0:x0 + resolution]
    return rgb


IMAGE_COLUMNS = ("image_png", "image")  # ingest.images, curate.pancap
CAPTION_COLUMNS = ("caption", "caption_text")


def _pick(names: list[str], options: tuple[str, ...]) -> str | None:
    return next((c for c in options if c in names), None)


# ---------------------------------------------------------------------------------------------
# The shared image-tokenize stage
# ---------------------------------------------------------------------------------------------


class ImageTokenizeConfig(StageConfig):
    model: str | None = Field(None, description="tokenizer family; default: the kind's own")
    size: str = Field("tiny", description="registry size (with no upstream tokenizer)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    weights: str | None = Field(None, description="released checkpoint (.safetensors, local or "
                                "s3://), loaded through the family's key map")
    resolution: int | None = Field(None, ge=8, description="crop size; default: the model's")
    flip: bool = True
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")


class ImageTokenizeStage(MapStage):
    """Base of the image tokenize kinds: model loading, decoding, preprocessing, views."""

    Config = ImageTokenizeConfig
    write_mode = "append"
    needs_range = (1, 2)
    #: families this kind accepts; the first is the default
    families: ClassVar[tuple[str, ...]]
    #: the model's pixel range: "unit" [0, 1] or "signed" [-1, 1]
    pixel_range: ClassVar[str] = "signed"
    config: ImageTokenizeConfig

    # -- model ----------------------------------------------------------------------------
    @property
    def family_name(self) -> str:
        name = self.config.model or self.families[0]
        if name not in self.families:
            raise StageError(f"stage '{self.ctx.stage}': `{self.kind}` takes model "
                             f"{' | '.join(self.families)}, got {name!r}")
        return name

    def tokenizer_ref(self) -> OutputRef | None:
        refs = [o["tokenizer"] for o in self.ctx.inputs.values() if "tokenizer" in o]
        return refs[0] if refs else None

    def model_config(self) -> Any:
        return family(self.family_name).config(self.config.size, **self.config.overrides)

    def row_fingerprint_parts(self) -> dict[str, Any]:
        ref = self.tokenizer_ref()
        if ref is not None:
            return {"weights": ref.digest}
        if self.config.weights:
            return {"weights_file": file_digest(self.config.weights)}
        from vgen_core.tokenizers.io import weights_digest

        return {"weights": weights_digest(self._build_seeded())}

    def _build_seeded(self):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.init_seed)
            return self.model_config().build().eval()

    def load_model(self):
        """The tokenizer, on CPU, in eval mode (upstream export > weights file > seeded)."""
        from vgen_core.tokenizers.io import load_pretrained

        ref = self.tokenizer_ref()
        self._tmp = tempfile.TemporaryDirectory()
        if ref is not None:
            model = load_pretrained(fetch_model_dir(ref.uri, self._tmp.name))
            if model.family not in self.families:
                raise StageError(f"stage '{self.ctx.stage}': upstream tokenizer {ref.uri} is a "
                                 f"'{model.family}' model; `{self.kind}` takes "
                                 f"{' | '.join(self.families)}")
            return model.eval()
        if self.config.weights:
            path = fetch_file(self.config.weights, self._tmp.name)
            return family(self.family_name).official(path, self.model_config()).eval()
        return self._build_seeded()

    def native_resolution(self, model) -> int | None:
        return getattr(model.config, "image_size", None)

    def setup(self) -> None:
        self.device = resolve_device(self.config.device)
        model = self.load_model()
        native = self.native_resolution(model)
        res = self.config.resolution or native
        if res is None:
            raise StageError(f"stage '{self.ctx.stage}': set with.resolution (the model has no "
                             "fixed image size)")
        if native is not None and res != native:
            raise StageError(f"stage '{self.ctx.stage}': with.resolution={res} but the "
                             f"{model.family} tokenizer encodes {native}x{native} images; set "
                             f"resolution: {native} or use a model of that size")
        self.resolution = res
        self.model = model.to(self.device).eval()

    def declared_resolution(self) -> int | None:
        """The crop size rows are made at, known on the driver (config, else the model's)."""
        if self.config.resolution:
            return self.config.resolution
        ref = self.tokenizer_ref()
        if ref is not None:
            import json

            from vgen_core.data.fsio import filesystem_for

            fs, path = filesystem_for(ref.uri)
            cfg = json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
            return cfg.get("image_size")
        return getattr(self.model_config(), "image_size", None)

    def commit_metadata(self) -> dict[str, str]:
        import json

        return {"vgen.preprocess": json.dumps({
            "kind": self.kind, "family": self.family_name,
            "resolution": self.declared_resolution(), "crop": "center", "resize": "bicubic",
            "baked": ["hflip"] if self.config.flip else [], "pixel_range": self.pixel_range},
            sort_keys=True)}

    # -- data -----------------------------------------------------------------------------
    def input_columns(self) -> list[str] | None:
        ref = self.samples_input()
        names = self.ctx.store.schema(ref.name).names
        image = _pick(names, IMAGE_COLUMNS)
        if image is None:
            raise StageError(f"stage '{self.ctx.stage}': upstream table {ref.uri} has no image "
                             f"column (expected one of {', '.join(IMAGE_COLUMNS)}); its columns "
                             f"are {', '.join(names)}")
        extra = [c for c in ("label", "source", _pick(names, CAPTION_COLUMNS)) if c and c in names]
        return ["sample_id", "content_digest", image, *extra]

    # -- decode: ahead of the actor (``prepare_batch``) on Ray, inline in process ------------
    def prepare_args(self) -> dict[str, Any] | None:
        res = self.declared_resolution()
        return None if res is None else {"resolution": int(res)}

    def prepare_batch(self, batch: pa.Table, resolution: int) -> pa.Table:
        """Decode + preprocess on a CPU task (no model): the image column becomes ``_pixels``
        (``resolution``² × 3 uint8 bytes, null where it failed) and ``_error`` (why)."""
        col = self._image_column(batch)
        pixels, errors = [], []
        for data in batch[col].to_pylist():
            try:
                pixels.append(preprocess(decode_image(data), resolution).tobytes())
                errors.append(None)
            except ValueError as e:
                pixels.append(None)
                errors.append(f"column '{col}': {e}")
            except Exception as e:  # noqa: BLE001 - e.g. PIL's DecompressionBombError: one sample
                pixels.append(None)
                errors.append(f"column '{col}': {type(e).__name__}: {e}")
        return (batch.drop_columns([col])
                .append_column("_pixels", pa.array(pixels, pa.binary()))
                .append_column("_error", pa.array(errors, pa.string()))
                .append_column("_resolution", pa.array([resolution] * batch.num_rows, pa.int32())))

    def _image_column(self, batch: pa.Table) -> str:
        col = _pick(batch.schema.names, IMAGE_COLUMNS)
        if col is None:
            raise StageError(f"stage '{self.ctx.stage}': batch has no image column "
                             f"({', '.join(IMAGE_COLUMNS)})")
        return col

    def decode_batch(self, batch: pa.Table) -> tuple[list[int], np.ndarray | None, list[dict]]:
        """Decode + preprocess every row (or take the pixels ``prepare_batch`` made); returns
        (kept row indices, (n, R, R, 3) uint8, quarantine records for the rest)."""
        names = batch.schema.names
        if "_pixels" not in names:
            batch = self.prepare_batch(batch, self.resolution)
        else:
            made = set(batch["_resolution"].to_pylist())
            if made - {self.resolution}:
                raise StageError(f"stage '{self.ctx.stage}': images were prepared at {made} px "
                                 f"but the model encodes {self.resolution} px; set "
                                 f"with.resolution: {self.resolution}")
        ids = batch["sample_id"].to_pylist()
        digests = batch["content_digest"].to_pylist()
        sources = batch["source"].to_pylist() if "source" in names else [None] * len(ids)
        r = self.resolution
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
        """uint8 (B, H, W, 3) tensor -> float (B, 3, H, W) in the model's pixel range."""
        x = images_BHWC.permute(0, 3, 1, 2).float()
        if self.pixel_range == "unit":
            return x.div(255.0).contiguous()
        return x.div(127.5).sub(1.0).contiguous()

    def common_columns(self, batch: pa.Table) -> dict[str, Any]:
        n, names = batch.num_rows, batch.schema.names
        cap = _pick(names, CAPTION_COLUMNS)
        return {
            "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
            "fingerprint": [self.ctx.row_fingerprint] * n,
            "label": batch["label"] if "label" in names else [-1] * n,
            "caption": batch[cap] if cap else [None] * n,
        }

    def process_batch(self, batch: pa.Table) -> BatchResult:
        import torch

        keep, images, quarantine = self.decode_batch(batch)
        if images is None:
            return BatchResult(self.output_schema.empty_table(), quarantine)
        batch = batch.take(keep)
        views = [images] + ([images[:, :, ::-1].copy()] if self.config.flip else [])
        with torch.inference_mode():
            outs = [self.encode(self.to_model(torch.from_numpy(v).to(self.device)))
                    for v in views]
        rows, more_q = self.make_rows(batch, outs[0], outs[1] if self.config.flip else None)
        return BatchResult(rows, quarantine + more_q)

    # -- per kind -------------------------------------------------------------------------
    def encode(self, x_BCHW) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

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
    """MaskBit LFQ: sign bits per position of a conv encoder's grid; index = sum bit_k 2^k."""

    kind = "tokenize.lfq"
    version = 3
    families = ("lfq",)

    def native_resolution(self, model) -> int | None:
        return None  # fully convolutional: any multiple of the downsampling factor

    def encode(self, x):
        _, bits_BhwK, indices_Bhw, _ = self.model.encode(x)
        return {"bits": bits_BhwK.cpu().numpy(), "indices": indices_Bhw.cpu().numpy()}


class TokenizeFSQ(_BitTokens):
    """BAR binary FSQ: one K-bit token per ViT patch (raster order)."""

    kind = "tokenize.fsq"
    version = 2
    families = ("bar_fsq",)

    def encode(self, x):
        _, bits_BLK, indices_BL = self.model.encode(x)
        g = self.model.config.grid_size
        B, L, K = bits_BLK.shape
        return {"bits": bits_BLK.reshape(B, g, g, K).cpu().numpy(),
                "indices": indices_BL.reshape(B, g, g).cpu().numpy()}


class TokenizeTiTok(ImageTokenizeStage):
    """TiTok / TA-TiTok VQ: K 1D token ids per image (text is only used at de-tokenization)."""

    kind = "tokenize.titok"
    version = 1
    families = ("titok", "tatitok")
    pixel_range = "unit"
    output_schema = ID_TOKENS

    def setup(self) -> None:
        super().setup()
        if self.model.config.quantize_mode != "vq":
            raise StageError(f"stage '{self.ctx.stage}': the TiTok model is a KL/VAE tokenizer "
                             "(continuous tokens); cache its posteriors with `cache.latents` "
                             "instead of `tokenize.titok`")

    def encode(self, x):
        _, info = self.model.encode(x)
        return {"indices": info["min_encoding_indices"].reshape(x.shape[0], -1).cpu().numpy()}

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
