"""Official MaskBit tokenizer checkpoint names -> `LFQTokenizer` (lfq.py) names.

Reference: markweberdev/maskbit @5ea3d73 `modeling/conv_vqgan.py` (ConvVQModel: `encoder`,
`decoder`, `quantize`), `modeling/modules/autoencoder.py` (ConvEncoder, ConvDecoder,
ConvDecoderLegacy, ResidualStage, DownsamplingStage, UpsamplingStage, ResidualBlock),
`modeling/quantizer/lookup_free.py` (buffers `bits_to_indices`, `codebook`). The released MaskBit
tokenizers are built with `ConvVQModel(config, legacy=False)` (demo_utils.get_tokenizer).

Every key of the released layout maps by a rename. With L = len(ch_mult) levels (l = level,
j = block), official -> here:

    encoder.conv_in.weight                          encoder.0.weight
    encoder.down.l.res_blocks.j.{norm1,conv1,norm2,conv2,nin_shortcut}.*
                                                    encoder.(1+2l).j.{...}.*
    encoder.down.l.down_conv.{weight,bias}          encoder.(2+2l).conv.*        (l < L-1)
    encoder.mid.res_blocks.j.*                      encoder.(2L).j.*
    encoder.norm_out.*                              encoder.(2L+1).*
    encoder.conv_out.*                              encoder.(2L+3).*
    decoder.conv_in.*                               decoder.0.*
    decoder.mid.res_blocks.j.*                      decoder.1.j.*
    decoder.up.i.res_blocks.j.*                     decoder.(2+2t).j.*   t = i (ConvDecoder),
    decoder.up.i.upsample_conv.*                    decoder.(3+2t).conv.*  t = L-1-i (legacy)
    decoder.norm_out.*                              decoder.(2L+1).*
    decoder.conv_out.*                              decoder.(2L+3).*
    quantize.bits_to_indices, quantize.codebook     dropped (implicit codebook; checked to be
                                                    the LSB-first one)

The channel-changing residual blocks (first block of a level whose width changes; with ch_mult
(1,1,2,2,4) encoder down.2/down.4 and decoder up.3/up.1, block 0) own `nin_shortcut`, a bias-free
(out, out, 1, 1) conv that the official `ResidualBlock` applies to the block OUTPUT (h + W h).
`LFQConfig(shortcut="official")`, the default and the value of every `maskbit-k*` size, builds the
same module under the same name, so those 4 weights load like the rest. A config with
`shortcut="input"` (an (out, in) conv on the block input: a different function) is refused for a
checkpoint that has `nin_shortcut` weights. Everything else matches as well: bias-free conv_in and
block convs, biased down/up/out convs, GroupNorm(32, eps 1e-6), TF-SAME stride-2 padding
(right/bottom), nearest x2 upsampling. Required: `norm_groups == 32` (the official GroupNorm is
always 32 groups).

Official checkpoints are `pytorch_model.bin` pickles; convert once to safetensors (see
`vgen_core.tokenizers.io.read_state_dict`), then load with `load_official_maskbit`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict
from vgen_core.tokenizers.lfq import LFQConfig, LFQTokenizer, lfq_config

__all__ = ["OFFICIAL_DROPPED", "load_official_maskbit", "nin_shortcut_keys", "official_key_map"]

_QUANTIZER_BUFFERS = ("quantize.bits_to_indices", "quantize.codebook")
#: released keys not loaded -> why (``vgen weights convert`` reports them)
OFFICIAL_DROPPED = dict.fromkeys(
    _QUANTIZER_BUFFERS, "fixed implicit-codebook buffer: checked to be the LSB-first codebook, "
    "not loaded")
_RE_ENC_DOWN = re.compile(r"^encoder\.down\.(\d+)\.(res_blocks\.(\d+)\..+|down_conv\..+)$")
_RE_DEC_UP = re.compile(r"^decoder\.up\.(\d+)\.(res_blocks\.(\d+)\..+|upsample_conv\..+)$")
_RE_UPSAMPLE_CONV = re.compile(r"^decoder\.up\.(\d+)\.upsample_conv\.")
_RE_MID = re.compile(r"^(encoder|decoder)\.mid\.res_blocks\.(\d+)\.(.+)$")


def _num_levels(keys: list[str]) -> int:
    levels = {int(m[1]) for k in keys if (m := re.match(r"^encoder\.down\.(\d+)\.", k))}
    if not levels:
        raise ValueError(
            "maskbit_keys: no 'encoder.down.<level>.*' keys; this is not an official MaskBit "
            "ConvVQModel state dict."
        )
    return max(levels) + 1


def _is_legacy(keys: list[str], n_levels: int) -> bool:
    """ConvDecoderLegacy stores up[level]; ConvDecoder stores up[L-1-level]. Level 0 has no
    upsample_conv, so the index without one tells them apart (ambiguous only for L = 1)."""
    has_upsample = {int(m[1]) for k in keys if (m := _RE_UPSAMPLE_CONV.match(k))}
    without = [i for i in range(n_levels) if i not in has_upsample]
    return without == [0] and n_levels > 1


def nin_shortcut_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """Official channel-changing shortcut weights (need `LFQConfig.shortcut == "official"`)."""
    return [k for k in state_dict if k.endswith(".nin_shortcut.weight")]


def official_key_map(
    state_dict: Mapping[str, Any], legacy_decoder: bool | None = None
) -> dict[str, str]:
    """Official MaskBit key -> `LFQTokenizer` key (for `LFQConfig(shortcut="official")`).

    Leaves out only the quantizer buffers. `legacy_decoder=None` detects
    ConvDecoder vs ConvDecoderLegacy numbering from the keys. Keys not recognised map to
    themselves, so a loader reports them as unexpected.
    """
    keys = list(state_dict)
    L = _num_levels(keys)
    legacy = _is_legacy(keys, L) if legacy_decoder is None else legacy_decoder
    out: dict[str, str] = {}
    for k in keys:
        if k in _QUANTIZER_BUFFERS:
            continue
        out[k] = _map_key(k, L, legacy)
    return out


def _map_key(k: str, L: int, legacy: bool) -> str:
    for side in ("encoder", "decoder"):
        for name, idx in (("conv_in", 0), ("norm_out", 2 * L + 1), ("conv_out", 2 * L + 3)):
            if k.startswith(f"{side}.{name}."):
                return f"{side}.{idx}.{k[len(side) + len(name) + 2:]}"
    if m := _RE_MID.match(k):
        idx = 2 * L if m[1] == "encoder" else 1
        return f"{m[1]}.{idx}.{m[2]}.{m[3]}"
    if m := _RE_ENC_DOWN.match(k):
        level, rest = int(m[1]), m[2]
        if rest.startswith("res_blocks."):
            return f"encoder.{1 + 2 * level}.{rest.removeprefix('res_blocks.')}"
        return f"encoder.{2 + 2 * level}.conv.{rest.removeprefix('down_conv.')}"
    if m := _RE_DEC_UP.match(k):
        i, rest = int(m[1]), m[2]
        t = L - 1 - i if legacy else i
        if rest.startswith("res_blocks."):
            return f"decoder.{2 + 2 * t}.{rest.removeprefix('res_blocks.')}"
        return f"decoder.{3 + 2 * t}.conv.{rest.removeprefix('upsample_conv.')}"
    return k


def load_official_maskbit(
    source: str | Path | Mapping[str, Tensor],
    size: str | LFQConfig,
    legacy_decoder: bool | None = None,
) -> LFQTokenizer:
    """Build `size` (an `LFQ_SIZES` name or a config) and load an official MaskBit state dict.

    `source` is a `.safetensors` path or a state dict with the official names. Returns the model in
    eval mode. Raises ValueError when the checkpoint holds `nin_shortcut` weights and the config has
    `shortcut="input"`, when `norm_groups != 32`, when the implicit-codebook buffers are not the
    LSB-first codebook of `token_bits` bits, or naming the first key whose shape does not fit.
    """
    config = size if isinstance(size, LFQConfig) else lfq_config(size)
    label = size if isinstance(size, str) else "custom config"
    what = f"maskbit_keys.load_official_maskbit({label})"
    state = read_state_dict(source, what=what)
    nin = nin_shortcut_keys(state)
    if nin and config.shortcut != "official":
        raise ValueError(
            f"{what}: the checkpoint has {len(nin)} official residual-shortcut weights, first "
            f"'{nin[0]}' {tuple(state[nin[0]].shape)}, which MaskBit applies to the block output; "
            f"the config has shortcut={config.shortcut!r} (an (out, in) conv on the block input). "
            "Use shortcut='official'."
        )
    if config.norm_groups != 32:
        raise ValueError(
            f"{what}: official MaskBit GroupNorm uses 32 groups, config has norm_groups="
            f"{config.norm_groups}."
        )
    _check_codebook_buffers(state, config.token_bits, what)
    model = LFQTokenizer(config)
    load_mapped_state_dict(model, state, official_key_map(state, legacy_decoder), what=what)
    return model.eval()


def _check_codebook_buffers(state: Mapping[str, Tensor], K: int, what: str) -> None:
    weights = state.get("quantize.bits_to_indices")
    if weights is not None and not torch.equal(weights.long().cpu(), 2 ** torch.arange(K)):
        raise ValueError(
            f"{what}: quantize.bits_to_indices {weights.tolist()} is not the LSB-first weights "
            f"of token_bits={K}; the checkpoint has a different bit count or order."
        )
    codebook = state.get("quantize.codebook")
    if codebook is not None and tuple(codebook.shape) != (1 << K, K):
        raise ValueError(
            f"{what}: quantize.codebook has shape {tuple(codebook.shape)}, expected "
            f"{(1 << K, K)} for token_bits={K}."
        )
