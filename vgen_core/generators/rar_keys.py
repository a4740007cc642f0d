"""Released RAR checkpoint names -> `RAR` (rar.py) names (no model code here: rar.py loads).

Reference: bytedance/1d-tokenizer @942a96f `modeling/rar.py` (RAR, Block, Attention, FinalLayer;
timm `Mlp`). The releases (`rar_{b,l,xl,xxl}.bin`, README_RAR.md) are loaded there with a strict
`load_state_dict` (demo_util.get_rar_generator), so a release holds exactly the official
`RAR.state_dict()` (the causal `attn_mask` buffer is non-persistent, hence absent). With L image
tokens, D width, H heads, M MLP width, V codebook size and C classes:

    released key                                  shape            here
    cls_token                                     (1, 1, D)        same
    embeddings.weight                             (V + C + 2, D)   same
    pos_embed                                     (1, L + 1024, D) rows [0, L + 2)
    target_aware_pos_embed                        (1, L + 1024, D) rows [2, L + 2)
    timesteps_embeddings                          (1, L + 100, D)  rows [0, L + 2)
    blocks.i.norm1 / norm2 .{weight,bias}         (D,)             same
    blocks.i.attn.qkv.{weight,bias}               (3D, D), (3D,)   same
    blocks.i.attn.q_norm / k_norm .{weight,bias}  (D / H,)         same
    blocks.i.attn.proj.{weight,bias}              (D, D), (D,)     same
    blocks.i.mlp.fc1.{weight,bias}                (M, D), (M,)     same
    blocks.i.mlp.fc2.{weight,bias}                (D, M), (D,)     same
    blocks.i.adaLN_modulation.1.{weight,bias}     (6D, D), (6D,)   same
    adaln_before_head.adaLN_modulation.1.*        (2D, D), (2D,)   same
    lm_head.{weight,bias}                         (V, D), (V,)     same

The official forward reads `pos_embed` rows 0, 1 (cls, condition) and 2 + p (token at position p),
`target_aware_pos_embed` rows 2 + p only (its prefix rows are never added) and
`timesteps_embeddings` rows [0, L + 2); the other rows are dropped (`OFFICIAL_DROPPED`), which
leaves every logit unchanged. L is read from the tables: rows(timesteps_embeddings) - 100 =
rows(pos_embed) - 1024 = rows(target_aware_pos_embed) - 1024.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["OFFICIAL_DROPPED", "official_key_map", "released_shape", "released_seq_len",
           "table_length"]

#: extra rows of the released position / step tables beyond what the official forward reads
POS_EXTRA, STEP_EXTRA = 1024, 100

#: released rows not loaded -> why (tables are loaded, only these rows are dropped)
OFFICIAL_DROPPED: dict[str, str] = {
    "pos_embed[L + 2:]": "rows past [cls, condition, L tokens]; the official forward never adds "
                         "them (the table has L + 1024 rows)",
    "target_aware_pos_embed[:2]": "prefix rows; the official forward adds zeros to the cls slot "
                                  "and reads rows 2 + position only",
    "target_aware_pos_embed[L + 2:]": "rows past the L target positions; never read",
    "timesteps_embeddings[L + 2:]": "per-slot condition rows past the L + 2 slots; never read "
                                    "(the table has L + 100 rows)",
}

_TABLES = ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
_TOP = (
    "cls_token", "embeddings.weight", *_TABLES,
    "adaln_before_head.adaLN_modulation.1.weight", "adaln_before_head.adaLN_modulation.1.bias",
    "lm_head.weight", "lm_head.bias",
)
_RE_BLOCK = re.compile(
    r"^blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2"
    r"|adaLN_modulation\.1)\.(weight|bias)$"
)
_WHAT = "rar official_key_map"
_SOURCE = "bytedance/1d-tokenizer@942a96f modeling/rar.py"


def table_length(state_dict: Mapping[str, Tensor], *, pos_extra: int, step_extra: int,
                 what: str, source: str, vgen_rows: str, name: str = "L") -> int:
    """The sequence length n of a released state dict whose ``pos_embed`` /
    ``target_aware_pos_embed`` have n + ``pos_extra`` rows and ``timesteps_embeddings``
    n + ``step_extra`` (RAR's layout, which BAR copies with other extras), checked consistent.

    Raises ValueError naming the table whose shape is not (1, rows, D) or whose rows disagree;
    ``vgen_rows`` describes a vgen export's tables (the usual mix-up).
    """
    rows = {}
    for key in _TABLES:
        t = state_dict[key]
        if t.ndim != 3 or t.shape[0] != 1:
            raise ValueError(f"{what}: '{key}' has shape {tuple(t.shape)}; the release stores "
                             "it as (1, rows, D).")
        rows[key] = int(t.shape[1])
    n = rows["timesteps_embeddings"] - step_extra
    for key in ("pos_embed", "target_aware_pos_embed"):
        if rows[key] - pos_extra != n or n < 1:
            raise ValueError(
                f"{what}: '{key}' has {rows[key]} rows but 'timesteps_embeddings' has "
                f"{rows['timesteps_embeddings']}; a release has {name} + {pos_extra} and "
                f"{name} + {step_extra} rows for the same {name} >= 1 ({source}). Is this a vgen "
                f"export (tables of {vgen_rows} rows)? Load it with load_pretrained."
            )
    return n


def released_seq_len(state_dict: Mapping[str, Tensor]) -> int:
    """L of a released state dict, from its three position / step tables (checked consistent).

    Raises ValueError naming the table whose shape is not (1, L + 1024 | L + 100, D).
    """
    return table_length(state_dict, pos_extra=POS_EXTRA, step_extra=STEP_EXTRA, what=_WHAT,
                        source=_SOURCE, vgen_rows="L + 2 / L / L + 2")


def released_shape(key: str, vgen_shape: tuple[int, ...], seq_len: int) -> tuple[int, ...]:
    """The released shape of vgen key `key` whose vgen shape is `vgen_shape` (for messages)."""
    if key in ("pos_embed", "target_aware_pos_embed"):
        return (1, seq_len + POS_EXTRA, vgen_shape[-1])
    if key == "timesteps_embeddings":
        return (1, seq_len + STEP_EXTRA, vgen_shape[-1])
    return tuple(vgen_shape)


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vgen-named state dict of a released RAR state dict (works on meta tensors).

    Every name is kept; the three tables are sliced to the rows the official forward reads:
    `pos_embed[:, :L + 2]`, `target_aware_pos_embed[:, 2:L + 2]` (so vgen row p = target
    position p), `timesteps_embeddings[:, :L + 2]` (views, no copy).

    Raises ValueError naming the first key that is not a released RAR key (e.g. another family's
    checkpoint or a vgen export), or the first top-level key the release must hold.
    """
    for key in state_dict:
        if key not in _TOP and not _RE_BLOCK.match(key):
            raise ValueError(
                f"{_WHAT}: '{key}' is not a key of a released RAR generator ({_SOURCE}: "
                "cls_token, embeddings, pos_embed, target_aware_pos_embed, timesteps_embeddings, "
                "blocks.<i>.{norm1,attn,norm2,mlp,adaLN_modulation}, adaln_before_head, lm_head)."
            )
    for key in _TOP:
        if key not in state_dict:
            raise ValueError(f"{_WHAT}: the state dict has no '{key}', which every released RAR "
                             f"holds ({_SOURCE}).")
    L = released_seq_len(state_dict)
    out = dict(state_dict)
    out["pos_embed"] = state_dict["pos_embed"][:, : L + 2]
    out["target_aware_pos_embed"] = state_dict["target_aware_pos_embed"][:, 2 : L + 2]
    out["timesteps_embeddings"] = state_dict["timesteps_embeddings"][:, : L + 2]
    return out
