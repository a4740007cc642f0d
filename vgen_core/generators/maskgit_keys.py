"""Released TiTok MaskGIT generator names -> `MaskGIT` (masked.py) names (masked.py loads).

Reference: bytedance/1d-tokenizer @942a96f `modeling/maskgit.py` (ImageBert: an HF `BertModel`
without pooler, `add_pooling_layer=False`, plus `model.lm_head`). The releases
`generator_titok_l32.bin` / `generator_titok_b64.bin` (README_TiTok.md, configs/infer/TiTok/
titok_{l32,b64}.yaml; HF yucornetto/generator_titok_{l32,b64}_imagenet) are loaded with a strict
`load_state_dict` (demo_util.get_titok_generator), so they hold exactly `ImageBert.state_dict()`.
With L image tokens, D width, M MLP width, V codebook size and C classes:

    released key                                           shape           here
    model.embeddings.word_embeddings.weight                (V + C + 2, D)  rows [0, V]: token_emb
                                                                           rows [V + 1, V + C + 1]:
                                                                           class_emb (last = null)
    model.embeddings.position_embeddings.weight            (L + 1, D)      pos_emb (1, L + 1, D)
    model.embeddings.token_type_embeddings.weight          (2, D)          row 0 added into pos_emb
    model.embeddings.LayerNorm.{weight,bias}               (D,)            emb_norm
    model.embeddings.position_ids (transformers < 4.31)    (1, L + 1)      checked, not loaded
    model.encoder.layer.i.attention.self.{query,key,value}.{weight,bias}
                                                           (D, D), (D,)    blocks.i.qkv, q|k|v
    model.encoder.layer.i.attention.output.dense.*         (D, D), (D,)    blocks.i.proj
    model.encoder.layer.i.attention.output.LayerNorm.*     (D,)            blocks.i.norm1
    model.encoder.layer.i.intermediate.dense.*             (M, D), (M,)    blocks.i.fc1
    model.encoder.layer.i.output.dense.*                   (D, M), (D,)    blocks.i.fc2
    model.encoder.layer.i.output.LayerNorm.*               (D,)            blocks.i.norm2
    model.lm_head.{weight,bias}                            (V, D), (V,)    head

BertEmbeddings adds `token_type_embeddings[0]` (token_type_ids default to the zero buffer) and
`position_embeddings[p]` to every slot p before its LayerNorm, so folding row 0 into the position
table changes no logit; row 1 is never read. The class token sits at slot 0: official condition
id V + 1 + c is class_emb row c, the drop label V + C + 1 is row C (`null_class_id`). V and C are
read from the tables: V = rows(lm_head.weight), C = rows(word_embeddings) - V - 2.

TiTok-S-128's generator (`generator_titok_s128.bin`, model_type "UViT": `UViTBert`, pre-norm
U-ViT blocks with long skips, 1024 x 20) is not built in vgen; its names are refused here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vgen_core.generators.masked import MaskGITConfig

__all__ = ["OFFICIAL_DROPPED", "check_released_names", "official_key_map", "released_shapes"]

_EMB = "model.embeddings."
_WORD = _EMB + "word_embeddings.weight"
_POS = _EMB + "position_embeddings.weight"
_TYPE = _EMB + "token_type_embeddings.weight"
_POS_IDS = _EMB + "position_ids"
_TYPE_IDS = _EMB + "token_type_ids"
_TOP = (_WORD, _POS, _TYPE, _EMB + "LayerNorm.weight", _EMB + "LayerNorm.bias",
        "model.lm_head.weight", "model.lm_head.bias")
#: fixed index buffers some transformers versions save; checked (arange / zeros), never loaded
_BUFFERS = (_POS_IDS, _TYPE_IDS)

#: released key -> vgen key, per block (q, k, v are concatenated into qkv)
_BLOCK = {
    "attention.output.dense": "proj", "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "fc1", "output.dense": "fc2", "output.LayerNorm": "norm2",
}
_QKV = ("query", "key", "value")
_RE_BLOCK = re.compile(
    r"^model\.encoder\.layer\.(\d+)\.(attention\.self\.(?:query|key|value)|attention\.output\.dense"
    r"|attention\.output\.LayerNorm|intermediate\.dense|output\.dense|output\.LayerNorm)"
    r"\.(weight|bias)$"
)
_RE_UVIT = re.compile(r"^(in_blocks|out_blocks|mid_block)\.")

#: released tensors (or rows) not loaded -> why
OFFICIAL_DROPPED: dict[str, str] = {
    "model.embeddings.token_type_embeddings.weight[1:]": (
        "segment-B row of BERT's token-type table; ImageBert never passes token_type_ids, so "
        "only row 0 is added (folded into pos_emb)"),
    _POS_IDS: "fixed arange(L + 1) index buffer (saved by transformers < 4.31); checked, not "
              "loaded",
    _TYPE_IDS: "fixed all-zero index buffer; checked, not loaded",
}

_WHAT = "maskgit official_key_map"
_SOURCE = "bytedance/1d-tokenizer@942a96f modeling/maskgit.py ImageBert"


def released_shapes(config: MaskGITConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the ImageBert release that fits `config` (no buffers)."""
    D, M, V, C, L = (config.hidden, config.mlp_dim, config.codebook_size, config.num_classes,
                     config.seq_len)
    shapes: dict[str, tuple[int, ...]] = {
        _WORD: (V + C + 2, D), _POS: (L + 1, D), _TYPE: (2, D),
        _EMB + "LayerNorm.weight": (D,), _EMB + "LayerNorm.bias": (D,),
        "model.lm_head.weight": (V, D), "model.lm_head.bias": (V,),
    }
    for i in range(config.depth):
        p = f"model.encoder.layer.{i}."
        for name, (w, b) in {
            **{f"attention.self.{n}": ((D, D), (D,)) for n in _QKV},
            "attention.output.dense": ((D, D), (D,)), "attention.output.LayerNorm": ((D,), (D,)),
            "intermediate.dense": ((M, D), (M,)), "output.dense": ((D, M), (D,)),
            "output.LayerNorm": ((D,), (D,)),
        }.items():
            shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = w, b
    return shapes


def _check_buffers(state_dict: Mapping[str, Tensor]) -> None:
    rows = int(state_dict[_POS].shape[0])
    for key in _BUFFERS:
        t = state_dict.get(key)
        if t is None:
            continue
        if tuple(t.shape) != (1, rows):
            raise ValueError(f"{_WHAT}: '{key}' has shape {tuple(t.shape)}; BertEmbeddings "
                             f"stores it as (1, {rows}) (max_position_embeddings = L + 1).")
        if t.is_meta:
            continue
        want = torch.arange(rows)[None] if key == _POS_IDS else torch.zeros(1, rows)
        if not torch.equal(t.cpu().long(), want.long()):
            raise ValueError(f"{_WHAT}: '{key}' is not the fixed "
                             f"{'arange' if key == _POS_IDS else 'zero'} buffer BertEmbeddings "
                             "registers; the checkpoint was edited or is not a release.")


def check_released_names(state_dict: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming the first key that is not a released ImageBert key, or the first
    top-level key every release holds that is missing."""
    uvit = next((k for k in state_dict if _RE_UVIT.match(k)), None)
    if uvit is not None:
        raise ValueError(
            f"{_WHAT}: '{uvit}' belongs to a UViTBert generator (TiTok-S-128, "
            "generator_titok_s128.bin: model_type 'UViT' in configs/infer/TiTok/titok_s128.yaml); "
            "vgen builds only the ViT (ImageBert) generators of L-32 and B-64.")
    for key in state_dict:
        if key not in _TOP and key not in _BUFFERS and not _RE_BLOCK.match(key):
            raise ValueError(
                f"{_WHAT}: '{key}' is not a key of a released TiTok MaskGIT generator ({_SOURCE}: "
                "model.embeddings.{word,position,token_type}_embeddings, model.embeddings."
                "LayerNorm, model.encoder.layer.<i>.{attention,intermediate,output}, "
                "model.lm_head).")
    for key in _TOP:
        if key not in state_dict:
            raise ValueError(f"{_WHAT}: the state dict has no '{key}', which every released "
                             f"TiTok MaskGIT generator holds ({_SOURCE}).")


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vgen-named state dict of a released TiTok MaskGIT generator (works on meta tensors).

    Splits `word_embeddings` into `token_emb` (rows [0, V]) and `class_emb` (rows [V + 1, V + C
    + 1]), adds `token_type_embeddings[0]` into the position table (`pos_emb`, (1, L + 1, D)),
    concatenates each layer's query | key | value into `qkv` and renames the rest; index buffers
    are checked and dropped (`OFFICIAL_DROPPED`).

    Raises ValueError naming the first key that is not a released ImageBert key (another
    family's checkpoint, a vgen export, TiTok-S-128's UViT generator), the first key a release
    must hold, or a table whose rows do not fit V and C.
    """
    check_released_names(state_dict)
    word, head = state_dict[_WORD], state_dict["model.lm_head.weight"]
    V = int(head.shape[0])
    if word.ndim != 2 or word.shape[0] < V + 3:
        raise ValueError(
            f"{_WHAT}: '{_WORD}' has shape {tuple(word.shape)} but 'model.lm_head.weight' has "
            f"{V} rows; a release's table holds V + C + 2 rows (V tokens, the mask id, C >= 1 "
            "classes, the drop label).")
    for key in (_POS, _TYPE):
        t = state_dict[key]
        if t.ndim != 2 or t.shape[-1] != word.shape[-1] or (key == _TYPE and t.shape[0] < 1):
            raise ValueError(f"{_WHAT}: '{key}' has shape {tuple(t.shape)}; an nn.Embedding "
                             f"table (rows, D) with D = {word.shape[-1]} (the width of "
                             f"'{_WORD}') is expected.")
    _check_buffers(state_dict)

    out: dict[str, Tensor] = {
        "token_emb.weight": word[: V + 1],
        "class_emb.weight": word[V + 1:],
        "pos_emb": (state_dict[_POS] + state_dict[_TYPE][0])[None],
        "emb_norm.weight": state_dict[_EMB + "LayerNorm.weight"],
        "emb_norm.bias": state_dict[_EMB + "LayerNorm.bias"],
        "head.weight": head,
        "head.bias": state_dict["model.lm_head.bias"],
    }
    layers = sorted({int(m.group(1)) for k in state_dict if (m := _RE_BLOCK.match(k))})
    for i in layers:
        src, dst = f"model.encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            names = [f"{src}attention.self.{n}.{part}" for n in _QKV]
            for name in names:
                if name not in state_dict:
                    raise ValueError(f"{_WHAT}: the state dict has no '{name}' (layer {i} has "
                                     "other attention weights).")
            qkv = [state_dict[n] for n in names]
            for name, t in zip(names[1:], qkv[1:]):
                if t.shape != qkv[0].shape:
                    raise ValueError(f"{_WHAT}: '{name}' has shape {tuple(t.shape)} but "
                                     f"'{names[0]}' has {tuple(qkv[0].shape)}.")
            out[f"{dst}qkv.{part}"] = torch.cat(qkv, dim=0)
            for released, ours in _BLOCK.items():
                key = f"{src}{released}.{part}"
                if key in state_dict:  # a missing one is named by load_official
                    out[f"{dst}{ours}.{part}"] = state_dict[key]
    return out
