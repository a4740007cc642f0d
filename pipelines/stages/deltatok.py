"""``tokenize.deltatok``: curated ViCaS videos -> delta-token side table (video only).

Per video: T frames (every ``frame_stride``-th frame, at most ``max_frames``) are resized and
center-cropped to ``resolution``, encoded by the frozen vision foundation model (a DINOv3-style
ViT: ``vfm_weights`` when the user has the released file, otherwise built from ``vfm_size`` with
its seed), and DeltaTok turns the features of each consecutive pair into ONE continuous delta
token (teacher-forced, as the official ``tokenize_offline``): a (T-1, D) float32 array per video,
stored with the frame indices and their timestamps (frame / fps). The DeltaTok weights come from
an upstream ``train.tokenizer`` (model: deltatok), ``weights:`` (official checkpoint) or the
registry ``size`` with ``init_seed``. Both models' digests enter the row fingerprint.

A video whose frames were not embedded by curation (``frames`` null: curate.vicas with
``decode_frames: false``), that has fewer than 2 frames, or whose frames fail to decode is
quarantined with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from vgen_core.data.schemas import DELTA_TOKENS

from vgen_core.data.fsio import fetch_file
from vgen_core.data.images import decode_image, preprocess

from .base import BatchResult, StageError, quarantine_record
from .tokenize import ImageTokenizeConfig, ImageTokenizeStage, weights_file_digest

__all__ = ["TokenizeDeltaTok", "TokenizeDeltaTokConfig"]


class TokenizeDeltaTokConfig(ImageTokenizeConfig):
    vfm_size: str = Field("tiny", description="VFM registry size (dinov3-vitb16 | tiny)")
    vfm_weights: str | None = Field(None, description="DINOv3 safetensors (transformers or "
                                    "Meta names), local or s3://")
    frame_stride: int = Field(1, ge=1)
    max_frames: int = Field(8, ge=2)
    flip: bool = False


class TokenizeDeltaTok(ImageTokenizeStage):
    kind = "tokenize.deltatok"
    version = 1
    Config = TokenizeDeltaTokConfig
    produces = "delta_tokens"
    output_schema = DELTA_TOKENS
    file_fields = ("vfm_weights",)  # checked to exist before anything runs (and weights_fields)
    config: TokenizeDeltaTokConfig

    def vfm_config(self):
        from vgen_core.tokenizers.deltatok import vfm_config

        return vfm_config(self.config.vfm_size)

    def row_fingerprint_parts(self) -> dict[str, Any]:
        parts = super().row_fingerprint_parts()
        if self.config.vfm_weights:
            parts["vfm_weights_file"] = weights_file_digest(self.config.vfm_weights,
                                                            self._where())
        else:
            from vgen_core.tokenizers.io import weights_digest

            parts["vfm"] = weights_digest(self.vfm_config().build())
        return parts

    def setup(self) -> None:
        if self.config.flip:
            raise StageError(f"stage '{self.ctx.stage}': flip is not supported for delta tokens")
        super().setup()
        from vgen_core.tokenizers.deltatok import load_vfm

        cfg = self.vfm_config()
        if self.config.vfm_weights:
            vfm = load_vfm(fetch_file(self.config.vfm_weights, self._tmp.name), cfg)
        else:
            vfm = cfg.build()
        if vfm.config.hidden_size != self.model.config.hidden_size:
            raise StageError(f"stage '{self.ctx.stage}': VFM width {vfm.config.hidden_size} != "
                             f"DeltaTok width {self.model.config.hidden_size}; pick matching "
                             "vfm_size and size")
        if self.resolution % vfm.config.patch_size:
            raise StageError(f"stage '{self.ctx.stage}': resolution {self.resolution} is not a "
                             f"multiple of the VFM patch size {vfm.config.patch_size}")
        self.vfm = vfm.to(self.device)

    def input_columns(self) -> list[str] | None:
        ref = self.samples_input()
        names = self.ctx.store.schema(ref.name).names
        need = ["sample_id", "content_digest", "frames", "fps"]
        missing = [c for c in need if c not in names]
        if missing:
            raise StageError(f"stage '{self.ctx.stage}': `tokenize.deltatok` reads a curated "
                             f"video table (curate.vicas); {ref.uri} lacks {', '.join(missing)}")
        return need + [c for c in ("source", "caption") if c in names]

    def frame_indices(self, n: int) -> list[int]:
        return list(range(0, n, self.config.frame_stride))[: self.config.max_frames]

    def prepare_args(self) -> None:
        return None  # clips decode inside the actor (one video a batch)

    def process_batch(self, batch: pa.Table) -> BatchResult:
        import torch

        names = batch.schema.names
        rows: dict[str, list] = {k: [] for k in DELTA_TOKENS.names}
        quarantine = []
        for r in batch.to_pylist():
            def bad(check: str, why: str, r: dict = r) -> None:
                quarantine.append(quarantine_record(
                    r["sample_id"], check, f"stage '{self.ctx.stage}', column 'frames': {why}",
                    content_digest=r["content_digest"], source=r.get("source")))

            frames = r["frames"]
            if frames is None:
                bad("frames", "frames were not embedded by curation; re-run curate.vicas with "
                              "decode_frames: true (the default)")
                continue
            idx = self.frame_indices(len(frames))
            if len(idx) < 2:
                bad("frames", f"{len(frames)} frame(s) with frame_stride "
                              f"{self.config.frame_stride}: need at least 2 for a delta token")
                continue
            try:
                clip = np.stack([preprocess(decode_image(frames[i]), self.resolution)
                                 for i in idx])
            except ValueError as e:
                bad("decode", str(e))
                continue
            with torch.inference_mode():
                x = torch.from_numpy(clip).to(self.device).permute(0, 3, 1, 2).float() / 255.0
                feats_TND = self.vfm(x)
                delta = self.encode_fn(self.model, feats_TND[None].float())["delta"][0]
            d = delta.float().cpu().numpy()
            if not np.isfinite(d).all():
                bad("non_finite", "DeltaTok produced NaN/Inf delta tokens; check the weights")
                continue
            fps = float(r["fps"]) or 30.0
            rows["sample_id"].append(r["sample_id"])
            rows["content_digest"].append(r["content_digest"])
            rows["fingerprint"].append(self.ctx.row_fingerprint)
            rows["caption"].append(r.get("caption") if "caption" in names else None)
            rows["num_steps"].append(d.shape[0])
            rows["dim"].append(d.shape[1])
            rows["frame_indices"].append(idx)
            rows["timestamps"].append([i / fps for i in idx])
            rows["delta"].append(d.reshape(-1))
        return BatchResult(pa.table(rows, schema=DELTA_TOKENS), quarantine)
