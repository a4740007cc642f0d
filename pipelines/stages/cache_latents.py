"""``cache.latents``: curated images -> a latent cache (posterior moments) side table.

For the continuous-latent generators (xAR, DeepFlow, MaskGen-KL, FlowTok): any tokenizer family
whose spec can fill ``latents`` (the KL-VAE, SD f8c4 / MAR KL-16; a TiTok / TA-TiTok in
``quantize_mode: vae``) encodes each crop (and its horizontal flip) and the
stage stores the posterior ``mean || logvar`` as float32 with its shape and the model's
``scale_factor`` (MAR/xAR ``main_cache.py`` convention: training samples the posterior and
scales it, so one cache serves every noise draw). A non-finite moment quarantines the sample
(check ``non_finite``) instead of poisoning a training run. See ``tokenize.py`` for the shared
model loading, preprocessing, fingerprints and incrementality.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vgen_core.data.schemas import LATENTS

from .base import quarantine_record
from .tokenize import ImageTokenizeStage

__all__ = ["CacheLatents"]


class CacheLatents(ImageTokenizeStage):
    kind = "cache.latents"
    version = 1
    produces = "latents"
    output_schema = LATENTS

    def scale_factor(self) -> float:
        return float(getattr(self.model.config, "scale_factor", 1.0))

    def make_rows(self, batch, out, out_flip):
        m = out["moments"]
        mf = out_flip["moments"] if out_flip is not None else None
        finite = np.isfinite(m.reshape(len(m), -1)).all(1)
        if mf is not None:
            finite &= np.isfinite(mf.reshape(len(mf), -1)).all(1)
        quarantine = []
        if not finite.all():
            names = batch.schema.names
            for i in np.flatnonzero(~finite):
                quarantine.append(quarantine_record(
                    batch["sample_id"][i].as_py(), "non_finite",
                    f"stage '{self.ctx.stage}': the {self.model.family} encoder produced NaN/Inf "
                    "moments for this image (column 'moments'); check the image and the "
                    "tokenizer weights (a diverged checkpoint gives NaN for every sample)",
                    content_digest=batch["content_digest"][i].as_py(),
                    source=batch["source"][i].as_py() if "source" in names else None))
            keep = np.flatnonzero(finite)
            batch, m = batch.take(keep), m[keep]
            mf = mf[keep] if mf is not None else None
        B = len(m)
        rows = {
            **self.common_columns(batch),
            "shape": [list(m.shape[1:])] * B,
            "scale_factor": [self.scale_factor()] * B,
            "moments": [r for r in m.reshape(B, -1).astype(np.float32)],
            "moments_flip": ([r for r in mf.reshape(B, -1).astype(np.float32)] if mf is not None
                             else [None] * B),
        }
        return pa.table(rows, schema=LATENTS), quarantine
