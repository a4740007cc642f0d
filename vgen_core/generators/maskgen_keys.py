"""Released MaskGen-VQ names -> `MaskGen` (maskgen.py) names (maskgen.py loads).

Reference: bytedance/1d-tokenizer @942a96f `modeling/maskgen.py` (MaskGen_VQ) with diffusers'
`JointTransformerBlock` (`AdaLayerNormZero`, `AdaLayerNormContinuous`, `Attention` with
`JointAttnProcessor2_0`, `FeedForward(activation_fn="gelu-approximate")`) and
`modeling/modules/blocks.py` WeightTiedLMHead. The releases `maskgen_vq_l.bin` /
`maskgen_vq_xl.bin` (README_MaskGen.md; HF turkeyju/generator_maskgen_vq_{l,xl}; configs/infer/
MaskGen/maskgen_vq_{l,xl}.yaml) are loaded with a strict `load_state_dict`
(demo_util.get_maskgen_vq_generator), so they hold exactly `MaskGen_VQ.state_dict()`: the
generator only. The CLIP text encoder is a separate open_clip model and is not in the file.
With L = 128 image tokens, D width, E = 768 CLIP text width, V = 8192 codebook size:

    released key                                          shape                   here
    embeddings.weight                                     (V + 1 + 1001, D)       same
    lm_head.weight (torch.save only; the HF safetensors   (V + 1 + 1001, D)       dropped: the tied
      export keeps one name for the shared tensor)                                head's alias
    pos_embed                                             (1, L, D)               same
    text_embed_proj.{weight,bias}                         (D, E), (D,)            same
    cond_pooled_proj.{weight,bias}                        (D, E + 256), (D,)      same
    norm.linear.{weight,bias}                             (2D, D), (2D,)          same
    blocks.i.norm1.linear.*                               (6D, D), (6D,)          same
    blocks.i.norm1_context.linear.*                       (6D, D) | last (2D, D)  same
    blocks.i.attn.to_{q,k,v}.*                            (D, D), (D,)            blocks.i.to_qkv
    blocks.i.attn.add_{q,k,v}_proj.*                      (D, D), (D,)            blocks.i.add_qkv
    blocks.i.attn.to_out.0.*                              (D, D), (D,)            blocks.i.to_out
    blocks.i.attn.to_add_out.*          (not last)        (D, D), (D,)            ...to_add_out
    blocks.i.ff.net.0.proj.* / ff.net.2.*                 (4D, D) / (D, 4D)       blocks.i.ff.fc1/2
    blocks.i.ff_context.net.0.proj.* / .net.2.* (not last)                        ff_context.fc1/2

q, k, v are concatenated in that order (vgen's `(3D, D)` projection is unpacked q | k | v).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vgen_core.generators.maskgen import MaskGenConfig

__all__ = ["CLIP_TEXT_WIDTH", "OFFICIAL_DROPPED", "check_released_names", "official_key_map",
           "released_shapes"]

#: width E of the text features the releases were trained on (open_clip ViT-L-14-336 text
#: tower; `config.model.vq_model.text_embed_dim` defaults to 768 and no release config sets it)
CLIP_TEXT_WIDTH = 768

_HEAD = "lm_head.weight"
_TOP = ("embeddings.weight", "pos_embed", "text_embed_proj.weight", "text_embed_proj.bias",
        "cond_pooled_proj.weight", "cond_pooled_proj.bias", "norm.linear.weight",
        "norm.linear.bias")

#: released name inside a block -> vgen name (to_q/k/v and add_q/k/v_proj are concatenated)
_RENAME = {
    "norm1.linear": "norm1.linear", "norm1_context.linear": "norm1_context.linear",
    "attn.to_out.0": "to_out", "attn.to_add_out": "to_add_out",
    "ff.net.0.proj": "ff.fc1", "ff.net.2": "ff.fc2",
    "ff_context.net.0.proj": "ff_context.fc1", "ff_context.net.2": "ff_context.fc2",
}
_FUSED = {"to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "add_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_RE_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1\.linear|norm1_context\.linear|attn\.to_[qkv]|attn\.add_[qkv]_proj"
    r"|attn\.to_out\.0|attn\.to_add_out|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj"
    r"|ff_context\.net\.2)\.(weight|bias)$"
)

#: released tensors not loaded -> why
OFFICIAL_DROPPED: dict[str, str] = {
    _HEAD: "WeightTiedLMHead's reference to embeddings.weight (the same tensor, saved twice by "
           "torch.save); the head reads embeddings.weight[:V]; checked equal, not loaded twice",
}

_WHAT = "maskgen official_key_map"
_SOURCE = "bytedance/1d-tokenizer@942a96f modeling/maskgen.py MaskGen_VQ"


def released_shapes(config: MaskGenConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the MaskGen_VQ release that fits `config` (without the
    optional `lm_head.weight` alias). E is `CLIP_TEXT_WIDTH`."""
    D, L, E = config.hidden, config.seq_len, CLIP_TEXT_WIDTH
    H = int(D * config.mlp_ratio)
    cond = E + (config.micro_condition_dim if config.micro_condition else 0)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.weight": (config.codebook_size + 1 + config.legacy_class_rows, D),
        "pos_embed": (1, L, D),
        "text_embed_proj.weight": (D, E), "text_embed_proj.bias": (D,),
        "cond_pooled_proj.weight": (D, cond), "cond_pooled_proj.bias": (D,),
        "norm.linear.weight": (2 * D, D), "norm.linear.bias": (2 * D,),
    }
    for i in range(config.depth):
        last = i == config.depth - 1
        parts: dict[str, tuple[int, int]] = {
            "norm1.linear": (6 * D, D), "norm1_context.linear": ((2 if last else 6) * D, D),
            **{n: (D, D) for names in _FUSED.values() for n in names},
            "attn.to_out.0": (D, D), "ff.net.0.proj": (H, D), "ff.net.2": (D, H),
        }
        if not last:
            parts.update({"attn.to_add_out": (D, D), "ff_context.net.0.proj": (H, D),
                          "ff_context.net.2": (D, H)})
        for name, (rows, cols) in parts.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def check_released_names(state_dict: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming the first key that is not a released MaskGen_VQ key (another
    family's checkpoint, a vgen export with `text_encoder.*` / fused `to_qkv`, MaskGen-KL), or
    the first top-level key every release holds that is missing."""
    for key in state_dict:
        if key not in _TOP and key != _HEAD and not _RE_BLOCK.match(key):
            raise ValueError(
                f"{_WHAT}: '{key}' is not a key of a released MaskGen-VQ generator ({_SOURCE}: "
                "embeddings, pos_embed, text_embed_proj, cond_pooled_proj, norm.linear, "
                "lm_head, blocks.<i>.{norm1,norm1_context,attn,ff,ff_context} of diffusers' "
                "JointTransformerBlock).")
    for key in _TOP:
        if key not in state_dict:
            raise ValueError(f"{_WHAT}: the state dict has no '{key}', which every released "
                             f"MaskGen-VQ generator holds ({_SOURCE}).")


def _check_tied_head(state_dict: Mapping[str, Tensor]) -> None:
    head = state_dict.get(_HEAD)
    if head is None:
        return
    emb = state_dict["embeddings.weight"]
    if head.shape != emb.shape:
        raise ValueError(f"{_WHAT}: '{_HEAD}' has shape {tuple(head.shape)} but "
                         f"'embeddings.weight' has {tuple(emb.shape)}; the release's head is "
                         "tied to the embedding table (WeightTiedLMHead).")
    if not (head.is_meta or emb.is_meta) and not torch.equal(head, emb):
        raise ValueError(f"{_WHAT}: '{_HEAD}' differs from 'embeddings.weight'; the release's "
                         "head is tied to the embedding table (WeightTiedLMHead), so this is "
                         "not a released MaskGen-VQ checkpoint (weight_tying: False is not "
                         "supported).")


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vgen-named state dict of a released MaskGen-VQ generator (works on meta tensors).

    Concatenates each block's `attn.to_{q,k,v}` into `to_qkv` and `attn.add_{q,k,v}_proj` into
    `add_qkv`, renames diffusers' `attn.to_out.0`, `attn.to_add_out`, `ff.net.{0.proj,2}` and
    `ff_context.net.{0.proj,2}`, keeps the other names, and drops the tied `lm_head.weight`
    after checking it equals `embeddings.weight` (`OFFICIAL_DROPPED`). No text encoder is in a
    release, so the result has no `text_encoder.*` keys.

    Raises ValueError naming the first key that is not a released MaskGen_VQ key, the first
    key a release must hold, a fused projection whose q, k, v parts differ in shape, or an
    `lm_head.weight` that is not the embedding table.
    """
    check_released_names(state_dict)
    _check_tied_head(state_dict)
    out: dict[str, Tensor] = {k: state_dict[k] for k in _TOP}
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := _RE_BLOCK.match(k))})
    for i in blocks:
        p = f"blocks.{i}."
        for part in ("weight", "bias"):
            for ours, names in _FUSED.items():
                keys = [f"{p}{n}.{part}" for n in names]
                for key in keys:
                    if key not in state_dict:
                        raise ValueError(f"{_WHAT}: the state dict has no '{key}' (block {i} "
                                         "has other attention weights).")
                ts = [state_dict[k] for k in keys]
                for key, t in zip(keys[1:], ts[1:]):
                    if t.shape != ts[0].shape:
                        raise ValueError(f"{_WHAT}: '{key}' has shape {tuple(t.shape)} but "
                                         f"'{keys[0]}' has {tuple(ts[0].shape)}.")
                out[f"{p}{ours}.{part}"] = torch.cat(ts, dim=0)
            for released, ours in _RENAME.items():
                key = f"{p}{released}.{part}"
                if key in state_dict:  # a missing one is named by load_official
                    out[f"{p}{ours}.{part}"] = state_dict[key]
    return out
