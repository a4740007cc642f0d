"""``tokenize.lfq``: curated images -> a bit-token side table (MaskBit-style LFQ tokens).

Needs the curated image stage and, usually, a ``train.tokenizer`` stage whose ``tokenizer``
output is loaded once per actor. Without one, the tokenizer is built from ``size`` with
``init_seed`` (useful for tests; its weights digest still enters the fingerprint).

Preprocessing (declared, part of the fingerprint): resize the shorter side to ``resolution``,
center crop; with ``flip: true`` the horizontally flipped image is tokenized too and stored in
``indices_flip``. Rows are keyed by (sample_id, content_digest, fingerprint), where the
fingerprint covers the weights digest, this config and the kind version; a re-run computes only
samples that are new, changed, or were made by another tokenizer.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from vgen_core.data.sample_images import decode_png
from vgen_core.data.schemas import BIT_TOKENS

from .base import BatchResult, MapStage, OutputRef, StageConfig


class TokenizeLFQConfig(StageConfig):
    size: str = Field("tiny", description="LFQ size, used when no upstream tokenizer is given")
    init_seed: int = 0
    resolution: int = Field(32, ge=8)
    flip: bool = True
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")


def fetch_model_dir(uri: str, dest: str) -> str:
    """Copy a model directory (local or s3://) to ``dest``; returns the local path."""
    from vgen_core.data.fsio import filesystem_for

    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def preprocess(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (bicubic) and center-crop to a square."""
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


class TokenizeLFQ(MapStage):
    kind = "tokenize.lfq"
    version = 1
    Config = TokenizeLFQConfig
    output_schema = BIT_TOKENS
    write_mode = "append"
    needs_range = (1, 2)
    config: TokenizeLFQConfig

    def tokenizer_ref(self) -> OutputRef | None:
        refs = [o["tokenizer"] for o in self.ctx.inputs.values() if "tokenizer" in o]
        return refs[0] if refs else None

    def row_fingerprint_parts(self) -> dict[str, Any]:
        ref = self.tokenizer_ref()
        if ref is not None:
            return {"weights": ref.digest}
        from vgen_core.tokenizers.io import weights_digest

        return {"weights": weights_digest(self._build_seeded())}

    def _build_seeded(self):
        import torch

        from vgen_core.tokenizers.lfq import lfq_config

        torch.manual_seed(self.config.init_seed)
        return lfq_config(self.config.size).build().eval()

    def setup(self) -> None:
        import torch

        from vgen_core.tokenizers.io import load_pretrained

        want = self.config.device
        self.device = torch.device("cuda" if want == "cuda" or (
            want == "auto" and torch.cuda.is_available()) else "cpu")
        ref = self.tokenizer_ref()
        if ref is None:
            model = self._build_seeded()
        else:
            self._tmp = tempfile.TemporaryDirectory()
            model = load_pretrained(fetch_model_dir(ref.uri, self._tmp.name), expected_family="lfq")
        self.model = model.to(self.device).eval()

    def process_batch(self, batch: pa.Table) -> BatchResult:
        import torch

        from vgen_core.tokenizers.lfq import pack_bits
        from vgen_core.training.tasks import images_to_model

        res = self.config.resolution
        images = np.stack([preprocess(decode_png(b), res)
                           for b in batch["image_png"].to_pylist()])
        views = [images] + ([images[:, :, ::-1].copy()] if self.config.flip else [])
        outs = []
        with torch.inference_mode():
            for v in views:
                x = images_to_model(torch.from_numpy(v).to(self.device))
                _, bits_BhwK, indices_Bhw, _ = self.model.encode(x)
                outs.append((bits_BhwK.cpu().numpy(), indices_Bhw.cpu().numpy()))
        bits, idx = outs[0]
        B, h, w, K = bits.shape
        flip_idx = outs[1][1].reshape(B, -1).astype(np.int32) if self.config.flip else None
        rows = {
            "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
            "fingerprint": [self.ctx.row_fingerprint] * B, "label": batch["label"],
            "grid_h": [h] * B, "grid_w": [w] * B, "token_bits": [K] * B,
            "indices": [r for r in idx.reshape(B, -1).astype(np.int32)],
            "bits_packed": [pack_bits(bits[i].reshape(-1, K)).tobytes() for i in range(B)],
            "indices_flip": [r for r in flip_idx] if flip_idx is not None else [None] * B,
        }
        return BatchResult(pa.table(rows, schema=BIT_TOKENS))
