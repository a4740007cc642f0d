"""Tokenizers: images -> discrete or continuous tokens, and back.

`lfq` holds the MaskBit lookup-free-quantization (bit token) tokenizer; `titok` TiTok and
TA-TiTok (1D tokens, VQ or KL; legacy two-stage TiTok decodes through its MaskGIT-VQGAN pixel
decoder); `maskgit_vqgan` the MaskGIT-VQGAN (f16, 1024 codes: RAR's tokenizer); `deltatok`
DeltaTok (one continuous delta token per frame pair over a frozen ViT feature extractor); `fsq`
BAR's binary-FSQ bit tokenizer; `kl_vae` the SD/MAR KL autoencoder whose latents are cached; `io`
the safetensors export/load shared by every family (``load_pretrained`` builds any registered
family from its ``config.json``; ``read_state_dict`` and ``load_mapped_state_dict`` load released
checkpoints through a key map, never unpickling). Each module also loads the official released
checkpoints through a documented key mapping (``vgen weights convert`` and the stages'
``weights:`` read them: :mod:`vgen_core.weights`).
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
