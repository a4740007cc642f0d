"""Generators over tokenizer outputs.

`masked` holds the MaskGIT family (bidirectional transformer, arccos-masked training, confidence
sampler with classifier-free guidance). One module per family; the building blocks they share
(attention, RoPE, RMSNorm, SwiGLU, adaLN, BERT / causal adaLN blocks, Gumbel noise) are in
`common`, the mask / guidance / temperature schedules in `schedules`. No family module imports
another one's private names.
"""

from vgen_core.generators.masked import (
    MASKGIT_SIZES,
    MaskGIT,
    MaskGITConfig,
    arccos_mask_ratio,
    masked_token_loss,
    maskgit_config,
    remask_count,
    sample,
)

__all__ = [
    "MASKGIT_SIZES",
    "MaskGIT",
    "MaskGITConfig",
    "arccos_mask_ratio",
    "masked_token_loss",
    "maskgit_config",
    "remask_count",
    "sample",
]
