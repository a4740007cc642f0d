"""GRAT (grouping first, attending smartly) sparse attention for (t, h, w) token grids.

Shape legend: B batch, Hh heads, D head dim, L = T*H*W image tokens (raster order) + n_text text
tokens appended after them.

    out_BHLD = grat_attention(q_BHLD, k_BHLD, v_BHLD, grid=(T, H, W), groups=(gt, gh, gw),
                              variant="criss_cross", n_text=0)

Image tokens are split into (gt, gh, gw) groups; every query of a group attends the same keys:
the groups in its three criss-cross planes of the group grid ("criss_cross", GRAT-X, the
official HunyuanVideo setting) or within ``radius`` groups on every axis ("block", GRAT-B), plus
the valid text tokens; text queries attend everything valid. ``n_text_valid`` (default n_text)
marks the non-pad text prefix; pad text keys are never attended. Differentiable in q, k, v.

Backend: the block-sparse Triton kernel (``triton.py``) on CUDA tensors when Triton imports, the
dense-mask PyTorch reference (``reference.py``) otherwise. ``VGEN_KERNELS=reference`` forces the
reference; ``VGEN_KERNELS=triton`` forces Triton (e.g. CPU tensors under ``TRITON_INTERPRET=1``).
``grat_attention_flex`` is the authors' FlexAttention formulation, for comparison. Pattern,
sparsity and cost: README.md in this folder.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from . import reference
from .._dispatch import choose_backend
from .reference import (
    GratSpec,
    grat_attention_reference,
    grat_density,
    grat_mask,
    group_permutation,
)

__all__ = [
    "GratSpec",
    "grat_attention",
    "grat_attention_flex",
    "grat_attention_reference",
    "grat_density",
    "grat_mask",
    "group_permutation",
]

def _triton_module() -> ModuleType | None:
    try:
        from . import triton as triton_impl
    except ImportError:
        return None
    return triton_impl


def _backend(x: Tensor) -> str:
    """'triton' or 'reference' for tensor x under VGEN_KERNELS."""
    return choose_backend(x, _triton_module)


def grat_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    groups: tuple[int, int, int],
    variant: str = "criss_cross",
    n_text: int = 0,
    *,
    n_text_valid: int | None = None,
    radius: int | tuple[int, int, int] = 1,
    scale: float | None = None,
    tokens_grouped: bool = False,
) -> Tensor:
    """GRAT attention of (B, Hh, L, D) q, k, v; returns (B, Hh, L, D) in the input token order.

    grid: (T, H, W) image token grid; groups: (gt, gh, gw), each dividing its grid size;
    variant: "criss_cross" or "block" (``radius`` groups per axis, int or (rt, rh, rw));
    n_text: text tokens after the image tokens, the first ``n_text_valid`` of them non-pad;
    scale: softmax scale, default 1/sqrt(D); tokens_grouped: inputs (and output) already in
    grouped order (``reference.to_grouped``), which skips two permutations per call.
    """
    if _backend(q) == "triton":
        impl = _triton_module()
        if impl is None:  # choose_backend picks triton only when it imports
            raise ImportError("grat_attention: triton backend chosen but triton does not import.")
        return impl.grat_attention(q, k, v, grid, groups, variant, n_text,
                                   n_text_valid=n_text_valid, radius=radius, scale=scale,
                                   tokens_grouped=tokens_grouped)
    return reference.grat_attention_reference(q, k, v, grid, groups, variant, n_text,
                                              n_text_valid=n_text_valid, radius=radius,
                                              scale=scale, tokens_grouped=tokens_grouped)


def grat_attention_flex(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
    """FlexAttention GRAT (the official formulation); see ``flex.grat_attention_flex``."""
    from .flex import grat_attention_flex as flex_impl

    return flex_impl(q, k, v, *args, **kwargs)
