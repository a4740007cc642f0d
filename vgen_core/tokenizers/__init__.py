"""Tokenizers: images -> discrete or continuous tokens, and back.

`lfq` holds the MaskBit lookup-free-quantization (bit token) tokenizer; `io` holds the generic
safetensors export/load used by every model family.
"""

from vgen_core.tokenizers.io import (
    load_pretrained,
    register_family,
    save_pretrained,
    weights_digest,
)
from vgen_core.tokenizers.lfq import (
    LFQ_SIZES,
    LFQConfig,
    LFQTokenizer,
    LookupFreeQuantizer,
    avg_entropy,
    bits_to_indices,
    entropy_anneal_multiplier,
    indices_to_bits,
    lfq_config,
    pack_bits,
    per_sample_entropy,
    unpack_bits,
)

__all__ = [
    "LFQ_SIZES",
    "LFQConfig",
    "LFQTokenizer",
    "LookupFreeQuantizer",
    "avg_entropy",
    "bits_to_indices",
    "entropy_anneal_multiplier",
    "indices_to_bits",
    "lfq_config",
    "load_pretrained",
    "pack_bits",
    "per_sample_entropy",
    "register_family",
    "save_pretrained",
    "unpack_bits",
    "weights_digest",
]
