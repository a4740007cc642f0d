"""The one dispatch rule every kernel folder follows.

``VGEN_KERNELS`` = ``auto`` (default: Triton for CUDA tensors when triton imports, the PyTorch
reference elsewhere), ``reference`` (always the reference) or ``triton`` (always Triton; under
``TRITON_INTERPRET=1`` this runs the kernels on CPU for tests).
"""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable

from torch import Tensor

MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("VGEN_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"VGEN_KERNELS={mode!r} is not a kernel mode; known: {', '.join(MODES)} "
            "(unset it for auto: Triton on CUDA, the reference elsewhere).")
    return mode


def choose_backend(x: Tensor, load_triton: Callable[[], Any | None]) -> str:
    """``"triton"`` or ``"reference"`` for tensor ``x``; ``load_triton()`` returns the folder's
    Triton module, or None when triton does not import."""
    mode = kernel_mode()
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if load_triton() is None:
            raise ImportError("VGEN_KERNELS=triton but triton does not import; pip install triton.")
        return "triton"
    return "triton" if x.is_cuda and load_triton() is not None else "reference"
