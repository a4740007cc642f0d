"""Released BAR generator checkpoint names -> `BAR` (bar.py) names (no model code: bar.py loads).

Reference: amazon-far/BAR (fork undefined443/BAR @faf903f) `modeling/generator.py` (BAR),
`modeling/mbm_head.py` (MaskBitModelingHead, ResBlock, GaussianFourierEmbedding),
`modeling/modules/blocks.py` (Block, Attention, RMSNorm, SwiGLUFFN, FinalLayer),
`modeling/modules/rope.py` (VisionRotaryEmbeddingFast). The releases (README "Model Zoo":
`assets/generator/bar_{b,b_patch2,b_patch4,l,l_res512}.bin` from the HF repo
FAR-Amazon/BAR-collections) are loaded by `sample_imagenet.py` with a strict
`generator.load_state_dict(torch.load(...))`, so a release holds exactly the official
`BAR.state_dict()` (the causal mask buffer is non-persistent, hence absent; the RoPE tables are
persistent buffers of the ONE rotary module every block's attention shares, so they appear once
per block). With T AR steps (image_seq_len / patch_size**2), J bits per step (token_size *
patch_size**2), P = 1 + repeat_class_condition prefix slots, D width, H heads, d = D / H,
F = int(2/3 * 4D), W head width (2048), G = int(2/3 * 4W), C classes:

    released key                                   shape                here
    cls_token                                      (1, 1, D)            same
    embeddings.weight                              (2 + 1 + C + 1, D)   same
    input_embeddings.weight                        (3, ceil(D / J))     same
    input_merge.{weight,bias}                      (D, J ceil(D / J))   same
    pos_embed                                      (1, T + 128, D)      rows [0, P + T)
    target_aware_pos_embed                         (1, T + 128, D)      rows [P, P + T)
    timesteps_embeddings                           (1, T + 100, D)      rows [0, P + T)
    blocks.i.norm1 / norm2 .weight                 (D,)                 same (RMSNorm)
    blocks.i.attn.qkv.{weight,bias}                (3D, D), (3D,)       same
    blocks.i.attn.q_norm / k_norm .weight          (d,)                 same (RMSNorm)
    blocks.i.attn.proj.{weight,bias}               (D, D), (D,)         same
    blocks.i.attn.rope.freqs_{cos,sin}             (P + T, d)           dropped: recomputed
    blocks.i.mlp.w12.{weight,bias}                 (2F, D), (2F,)       same
    blocks.i.mlp.w3.{weight,bias}                  (D, F), (D,)         same
    blocks.i.adaLN_modulation.1.{weight,bias}      (6D, D), (6D,)       same
    norm.weight                                    (D,)                 same
    latent_condition_proj.{weight,bias}            (W, D), (W,)         same
    lm_head.input_embed.weight                     (3, ceil(W / J))     same
    lm_head.input_proj.{weight,bias}               (W, J ceil(W / J))   same
    lm_head.ln_pre.weight                          (W,)                 same
    lm_head.transformer.j.in_ln.weight             (W,)                 same
    lm_head.transformer.j.mlp.w12 / w3 .*          (2G, W) / (W, G)     same
    lm_head.transformer.j.adaLN_modulation.1.*     (3W, W), (3W,)       same
    lm_head.output_embed.{weight,bias}             (2J, W), (2J,)       same
    lm_head.t_embedder.W                           (256,)               same (fixed Fourier W)
    lm_head.t_embedder.mlp.{0,2}.{weight,bias}     (W, 512), (W, W)     same
    lm_head.adaln_before_head.norm_final.weight    (W,)                 same
    lm_head.adaln_before_head.adaLN_modulation.1.* (2W, W), (2W,)       same

The official forward reads `pos_embed` rows [0, P) (cls + repeated class slots) and P + p (token
at step position p), `target_aware_pos_embed` rows P + p only (its prefix slots get row
P + orders[0]) and `timesteps_embeddings` rows [0, P + T); the other rows are dropped
(`OFFICIAL_DROPPED`), which leaves every output unchanged. T is read from the tables:
rows(timesteps_embeddings) - 100 = rows(pos_embed) - 128 = rows(target_aware_pos_embed) - 128;
P = rows(blocks.0.attn.rope.freqs_cos) - T.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = [
    "OFFICIAL_DROPPED",
    "official_key_map",
    "released_prefix_len",
    "released_shape",
    "released_steps",
    "rope_buffer_keys",
]

#: extra rows of the released position / step tables beyond the T AR steps
POS_EXTRA, STEP_EXTRA = 128, 100

#: released keys / rows not loaded -> why (tables are loaded, only these rows are dropped)
OFFICIAL_DROPPED: dict[str, str] = {
    "attn.rope.freqs_cos": "RoPE cos table (persistent buffer of the rotary module shared by every "
                           "block); a function of the config, recomputed by bar.rope_table "
                           "(load_official checks the released values against it)",
    "attn.rope.freqs_sin": "RoPE sin table (as freqs_cos)",
    "pos_embed[P + T:]": "rows past [cls, repeated class slots, T tokens]; the official forward "
                         "never adds them (the table has T + 128 rows)",
    "target_aware_pos_embed[:P]": "prefix rows; never read (the prefix slots get the row of the "
                                  "first target, P + orders[0])",
    "target_aware_pos_embed[P + T:]": "rows past the T target positions; never read",
    "timesteps_embeddings[P + T:]": "per-slot condition rows past the P + T slots; never read "
                                    "(the table has T + 100 rows)",
}

_TABLES = ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
_TOP = (
    "cls_token", "embeddings.weight", "input_embeddings.weight", "input_merge.weight",
    "input_merge.bias", *_TABLES, "norm.weight", "latent_condition_proj.weight",
    "latent_condition_proj.bias", "lm_head.input_embed.weight", "lm_head.input_proj.weight",
    "lm_head.input_proj.bias", "lm_head.ln_pre.weight", "lm_head.output_embed.weight",
    "lm_head.output_embed.bias", "lm_head.t_embedder.W", "lm_head.t_embedder.mlp.0.weight",
    "lm_head.t_embedder.mlp.0.bias", "lm_head.t_embedder.mlp.2.weight",
    "lm_head.t_embedder.mlp.2.bias", "lm_head.adaln_before_head.norm_final.weight",
    "lm_head.adaln_before_head.adaLN_modulation.1.weight",
    "lm_head.adaln_before_head.adaLN_modulation.1.bias",
)
_RE_BLOCK = re.compile(
    r"^blocks\.\d+\.(?:(?:norm1|norm2|attn\.q_norm|attn\.k_norm)\.weight"
    r"|(?:attn\.qkv|attn\.proj|mlp\.w12|mlp\.w3|adaLN_modulation\.1)\.(?:weight|bias)"
    r"|attn\.rope\.freqs_(?:cos|sin))$"
)
_RE_HEAD_BLOCK = re.compile(
    r"^lm_head\.transformer\.\d+\.(?:in_ln\.weight"
    r"|(?:mlp\.w12|mlp\.w3|adaLN_modulation\.1)\.(?:weight|bias))$"
)
_RE_ROPE = re.compile(r"^blocks\.\d+\.attn\.rope\.freqs_(?:cos|sin)$")
_WHAT = "bar official_key_map"
_SOURCE = "undefined443/BAR@faf903f modeling/generator.py"


def rope_buffer_keys(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The released per-block RoPE buffers `blocks.<i>.attn.rope.freqs_{cos,sin}` (dropped)."""
    return [k for k in state_dict if _RE_ROPE.match(k)]


def released_steps(state_dict: Mapping[str, Tensor]) -> int:
    """T (AR steps) of a released state dict, from its three position / step tables (checked).

    Raises ValueError naming the table whose shape is not (1, T + 128 | T + 100, D).
    """
    from vgen_core.generators.rar_keys import table_length

    return table_length(state_dict, pos_extra=POS_EXTRA, step_extra=STEP_EXTRA, what=_WHAT,
                        source=_SOURCE, vgen_rows="P + T / T / P + T", name="T")


def released_prefix_len(state_dict: Mapping[str, Tensor], steps: int) -> int:
    """P = 1 + repeat_class_condition of a release: rows of its RoPE tables minus T (checked:
    every block's table has the same shape, and P + T fits the position / step tables)."""
    keys = rope_buffer_keys(state_dict)
    if not keys:
        raise ValueError(f"{_WHAT}: the state dict has no 'blocks.<i>.attn.rope.freqs_cos', "
                         f"which every released BAR holds ({_SOURCE}: RoPE is always on).")
    shapes = {tuple(state_dict[k].shape) for k in keys}
    first = keys[0]
    shape = tuple(state_dict[first].shape)
    if len(shapes) != 1 or len(shape) != 2:
        odd = next(k for k in keys if tuple(state_dict[k].shape) != shape) if len(shapes) > 1 \
            else first
        raise ValueError(f"{_WHAT}: '{odd}' has shape {tuple(state_dict[odd].shape)}; the "
                         "released RoPE tables are (P + T, head_dim), the same in every block.")
    P = shape[0] - steps
    if P < 2 or P > STEP_EXTRA:
        raise ValueError(
            f"{_WHAT}: '{first}' has {shape[0]} rows, so P = {P} prefix slots for T = {steps} "
            f"steps; a release has 2 <= P <= {STEP_EXTRA} (1 cls + repeat_class_condition)."
        )
    return P


def released_shape(key: str, vgen_shape: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """The released shape of vgen key `key` whose vgen shape is `vgen_shape` (for messages)."""
    if key in ("pos_embed", "target_aware_pos_embed"):
        return (1, steps + POS_EXTRA, vgen_shape[-1])
    if key == "timesteps_embeddings":
        return (1, steps + STEP_EXTRA, vgen_shape[-1])
    return tuple(vgen_shape)


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vgen-named state dict of a released BAR generator state dict (works on meta tensors).

    Every name but the per-block RoPE buffers is kept (those are dropped: `OFFICIAL_DROPPED`);
    the three tables are sliced to the rows the official forward reads: `pos_embed[:, :P + T]`,
    `target_aware_pos_embed[:, P:P + T]` (so vgen row p = target step position p),
    `timesteps_embeddings[:, :P + T]` (views, no copy).

    Raises ValueError naming the first key that is not a released BAR key (e.g. another family's
    checkpoint or a vgen export), or the first top-level key the release must hold.
    """
    for key in state_dict:
        if key not in _TOP and not _RE_BLOCK.match(key) and not _RE_HEAD_BLOCK.match(key):
            raise ValueError(
                f"{_WHAT}: '{key}' is not a key of a released BAR generator ({_SOURCE}: "
                "cls_token, embeddings, input_embeddings, input_merge, pos_embed, "
                "target_aware_pos_embed, timesteps_embeddings, blocks.<i>.{norm1,attn,norm2,mlp,"
                "adaLN_modulation}, norm, latent_condition_proj, lm_head.*)."
            )
    for key in _TOP:
        if key not in state_dict:
            raise ValueError(f"{_WHAT}: the state dict has no '{key}', which every released BAR "
                             f"holds ({_SOURCE}).")
    T = released_steps(state_dict)
    P = released_prefix_len(state_dict, T)
    rope = set(rope_buffer_keys(state_dict))
    out = {k: v for k, v in state_dict.items() if k not in rope}
    out["pos_embed"] = state_dict["pos_embed"][:, : P + T]
    out["target_aware_pos_embed"] = state_dict["target_aware_pos_embed"][:, P : P + T]
    out["timesteps_embeddings"] = state_dict["timesteps_embeddings"][:, : P + T]
    return out
