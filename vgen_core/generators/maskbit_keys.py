"""Released MaskBit generator names -> `MaskBit` (maskbit.py) names (maskbit.py does the load).

Reference: markweberdev/maskbit @5ea3d73 `modeling/bert.py` (LFQBert, TransformerEncoder,
BertAttention with `torch.nn.MultiheadAttention`, BertFeedForward), `demo_utils.get_generator` /
`scripts/eval_maskbit.py` (strict `load_pretrained(path, rename_keys={"token_emb": "input_proj"})`:
the released `maskbit_generator_{10,12,14,16,18}bit` files name the input projection `token_emb`).
All releases are `model_cls: lfq_bert`, `use_prenorm: False`. With K token bits, G codebook splits,
e = K / G bits per group, D width, M MLP width, L = 256 positions, C = 1000 classes:

    released key                                    shape               here
    token_emb.{weight,bias} (or input_proj.*)       (D, K), (D,)        input_proj.*
    class_emb.weight                                (C + 1, D)          class_emb.weight
    pos_emb                                         (1, L + 1, D)       pos_emb
    first_layer.0.{weight,bias}  (LayerNorm)        (D,)                emb_norm.*
    transformer.layers.i.0.mha.in_proj_weight       (3D, D) [q; k; v]   blocks.i.qkv.weight
    transformer.layers.i.0.mha.in_proj_bias         (3D,)               blocks.i.qkv.bias
    transformer.layers.i.0.mha.out_proj.*           (D, D), (D,)        blocks.i.proj.*
    transformer.layers.i.0.norm.*                   (D,)                blocks.i.norm1.*
    transformer.layers.i.1.net.0.*                  (M, D), (M,)        blocks.i.fc1.*
    transformer.layers.i.1.net.2.*                  (D, M), (D,)        blocks.i.fc2.*
    transformer.layers.i.1.norm.*                   (D,)                blocks.i.norm2.*
    last_layer.0.*  (Linear)                        (D, D), (D,)        last_fc.*
    last_layer.2.*  (LayerNorm)                     (D,)                last_norm.*
    prediction_layer.*                              (G 2^e, D), (G 2^e,) head.*
    bits_to_indices  (int32 buffer 2^j, j < e)      (e,)                dropped, values checked

`nn.MultiheadAttention` stacks q, k, v in `in_proj_weight` in the order and per-head layout of
`BertBlock.qkv` (view (3, H, D / H)), so it is copied unsplit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["OFFICIAL_DROPPED", "official_key_map", "released_name"]

#: released keys not loaded -> why
OFFICIAL_DROPPED: dict[str, str] = {
    "bits_to_indices": "fixed buffer 2^j (j < K / G) of LFQBert.preprocess_tokens; checked to hold "
                       "those values (vgen computes the bits with shifts), not loaded",
}

_TOP = {
    "class_emb.weight": "class_emb.weight",
    "pos_emb": "pos_emb",
    "first_layer.0.weight": "emb_norm.weight",
    "first_layer.0.bias": "emb_norm.bias",
    "last_layer.0.weight": "last_fc.weight",
    "last_layer.0.bias": "last_fc.bias",
    "last_layer.2.weight": "last_norm.weight",
    "last_layer.2.bias": "last_norm.bias",
    "prediction_layer.weight": "head.weight",
    "prediction_layer.bias": "head.bias",
}
_INPUT_PREFIXES = ("token_emb.", "input_proj.")
_LAYER = {
    "0.mha.in_proj_weight": "qkv.weight",
    "0.mha.in_proj_bias": "qkv.bias",
    "0.mha.out_proj.weight": "proj.weight",
    "0.mha.out_proj.bias": "proj.bias",
    "0.norm.weight": "norm1.weight",
    "0.norm.bias": "norm1.bias",
    "1.net.0.weight": "fc1.weight",
    "1.net.0.bias": "fc1.bias",
    "1.net.2.weight": "fc2.weight",
    "1.net.2.bias": "fc2.bias",
    "1.norm.weight": "norm2.weight",
    "1.norm.bias": "norm2.bias",
}
_RE_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_RE_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BUFFER = "bits_to_indices"
_WHAT = "maskbit official_key_map"
_SOURCE = "markweberdev/maskbit@5ea3d73 modeling/bert.py LFQBert"


def released_name(vgen_key: str, input_prefix: str = "token_emb.") -> str:
    """The released name of vgen key `vgen_key` (for messages; the input as `input_prefix`)."""
    if vgen_key.startswith("input_proj."):
        return input_prefix + vgen_key.removeprefix("input_proj.")
    for src, dst in _TOP.items():
        if dst == vgen_key:
            return src
    if m := _RE_BLOCK.match(vgen_key):
        for src, dst in _LAYER.items():
            if dst == m[2]:
                return f"transformer.layers.{m[1]}.{src}"
    return vgen_key


def _refuse(key: str) -> ValueError:
    if key.startswith("norm_after_transformer."):
        why = ("it belongs to a use_prenorm=True LFQBert (pre-norm blocks), which no release uses "
               "and vgen's post-norm MaskBit does not compute")
    elif key.startswith(("tok_emb_list.", "bias.")):
        why = "it belongs to the index-token `Bert` (model_cls 'bert'), not the bit-token LFQBert"
    else:
        why = ("the released LFQBert holds token_emb (or input_proj), class_emb, pos_emb, "
               "first_layer, transformer.layers.<i>.{0.mha,0.norm,1.net,1.norm}, last_layer, "
               "prediction_layer, bits_to_indices")
    return ValueError(f"{_WHAT}: '{key}' is not a key of a released MaskBit generator "
                      f"({_SOURCE}): {why}.")


def check_bits_to_indices(state_dict: Mapping[str, Tensor]) -> int:
    """e = K / G from the released `bits_to_indices` buffer, checked to be 2^j for j < e and
    consistent with `token_emb` (K inputs) and `prediction_layer` (G 2^e outputs). Values are
    checked unless the tensor is on the meta device. Raises ValueError naming the key."""
    buf = state_dict[_BUFFER]
    if buf.ndim != 1 or buf.shape[0] < 1:
        raise ValueError(f"{_WHAT}: '{_BUFFER}' has shape {tuple(buf.shape)}; the release holds "
                         "(e,) = (K / codebook_splits,).")
    e = int(buf.shape[0])
    if buf.device.type != "meta":
        want = torch.pow(2, torch.arange(e, device="cpu"))  # also under a meta default device
        if buf.dtype.is_floating_point or not torch.equal(buf.cpu().long(), want):
            raise ValueError(
                f"{_WHAT}: '{_BUFFER}' holds {buf.tolist()} ({buf.dtype}); the release holds the "
                f"integers {want.tolist()} (2^j, j < {e}; {_SOURCE}.__init__)."
            )
    k = int(next(v for n, v in state_dict.items() if n.startswith(_INPUT_PREFIXES)
                 and n.endswith(".weight")).shape[-1])
    head = int(state_dict["prediction_layer.weight"].shape[0])
    if k % e or head != (k // e) << e:
        raise ValueError(
            f"{_WHAT}: '{_BUFFER}' has {e} entries (e = K / G bits per group) but the input "
            f"projection takes K = {k} bits and 'prediction_layer.weight' has {head} rows; a "
            f"release has K divisible by e and G * 2^e = {(k // e) << e if k % e == 0 else '?'} "
            "rows."
        )
    return e


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vgen-named state dict of a released MaskBit generator (works on meta tensors).

    Renames only (table above); `bits_to_indices` is checked (`check_bits_to_indices`) and left
    out. Raises ValueError naming the first key that is not a released LFQBert key (another
    family, a vgen export, the `Bert` or pre-norm variants), a required key that is missing, or
    a `bits_to_indices` that is not the fixed buffer.
    """
    out: dict[str, Tensor] = {}
    inputs = sorted({k.split(".")[0] for k in state_dict if k.startswith(_INPUT_PREFIXES)})
    if len(inputs) > 1:
        raise ValueError(f"{_WHAT}: both 'token_emb.*' and 'input_proj.*' are present; a release "
                         "holds one input projection (token_emb, renamed input_proj on load).")
    for key, tensor in state_dict.items():
        if key == _BUFFER:
            continue
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif key.startswith(_INPUT_PREFIXES) and key.split(".", 1)[1] in ("weight", "bias"):
            out["input_proj." + key.split(".", 1)[1]] = tensor
        elif (m := _RE_LAYER.match(key)) and m[2] in _LAYER:
            out[f"blocks.{m[1]}.{_LAYER[m[2]]}"] = tensor
        else:
            raise _refuse(key)
    prefix = (inputs[0] + ".") if inputs else "token_emb."
    for key in (*_TOP, f"{prefix}weight", f"{prefix}bias", _BUFFER):
        if key not in state_dict:
            raise ValueError(f"{_WHAT}: the state dict has no '{key}', which every released "
                             f"MaskBit generator holds ({_SOURCE}).")
    check_bits_to_indices(state_dict)
    return out
