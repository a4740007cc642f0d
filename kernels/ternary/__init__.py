"""Ternary (1.58-bit, BitNet b1.58 absmean) linear layers with 2-bit packed weights.

``ternary_matmul`` dispatches to the Triton kernel for CUDA tensors and to the PyTorch reference
elsewhere; ``VGEN_KERNELS=reference`` forces the reference, ``VGEN_KERNELS=triton`` forces Triton
(on CPU only useful under ``TRITON_INTERPRET=1``). ``TernaryLinear`` holds the packed weight;
``convert_linear_layers`` quantizes a trained model's ``nn.Linear`` layers in place. The maths and
the packed layout are in ``README.md`` and ``reference.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .._dispatch import choose_backend
from .reference import (
    EPS,
    dequantize_ternary,
    pack_ternary,
    packed_bytes_per_row,
    quantize_and_pack,
    quantize_ternary,
    ternary_matmul_reference,
    unpack_ternary,
)

__all__ = [
    "EPS",
    "ConversionReport",
    "TernaryLinear",
    "convert_linear_layers",
    "dequantize_ternary",
    "pack_ternary",
    "quantize_and_pack",
    "quantize_ternary",
    "ternary_backend",
    "ternary_matmul",
    "ternary_matmul_reference",
    "unpack_ternary",
]



def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ternary_backend(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: what :func:`ternary_matmul` runs for this input."""
    return choose_backend(x, lambda: True if _triton_available() else None)


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (unpack(packed) * scale).T (+ bias)``, returned in ``x.dtype``.

    x ``(..., K)``, packed ``(N, ceil(K / 4))`` uint8, scale ``(N,)`` float, bias ``(N,)`` or
    None; returns ``(..., N)``. Triton on CUDA, the fp32 reference elsewhere.
    """
    if ternary_backend(x) == "triton":
        from .triton import ternary_matmul_triton

        return ternary_matmul_triton(x, packed, scale, in_features, bias)
    return ternary_matmul_reference(x, packed, scale, in_features, bias)


class TernaryLinear(nn.Module):
    """``nn.Linear`` with a ternary weight: buffers ``packed`` ``(out, ceil(in / 4))`` uint8,
    ``scale`` ``(out,)`` fp32 and optional ``bias`` ``(out,)``. Inference only for the weight (it
    is a buffer, not a parameter); gradients flow to the input."""

    packed: torch.Tensor  # buffers
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("packed", torch.zeros(
            out_features, packed_bytes_per_row(in_features), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, eps: float = EPS) -> TernaryLinear:
        """Quantize a (trained) ``nn.Linear``: same device; the bias keeps its dtype."""
        weight = linear.weight.detach()
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, bias=has_bias, device=weight.device,
                    bias_dtype=linear.bias.dtype if has_bias else torch.float32)
        packed, scale = quantize_and_pack(weight, eps)
        layer.packed.copy_(packed)
        layer.scale.copy_(scale)
        if has_bias:
            assert layer.bias is not None  # built with bias=True
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_matmul(x, self.packed, self.scale, self.in_features, self.bias)

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus scales (bias excluded)."""
        return (self.packed.numel() * self.packed.element_size()
                + self.scale.numel() * self.scale.element_size())

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight ``(out, in)`` in fp32."""
        return dequantize_ternary(self.packed, self.scale, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=ternary 2-bit packed "
                f"({self.weight_nbytes()} bytes)")


@dataclass
class ConversionReport:
    """What :func:`convert_linear_layers` did. Byte counts cover weights only (packed + scale
    after; the original weight tensors before); biases are unchanged and not counted."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    bf16_bytes: int = 0

    @property
    def ratio_to_bf16(self) -> float:
        """Quantized weight bytes / the same weights in bf16 (0.0 if nothing was converted)."""
        return self.bytes_after / self.bf16_bytes if self.bf16_bytes else 0.0

    def __str__(self) -> str:
        return (f"converted {len(self.converted)} linear layers ({len(self.skipped)} skipped): "
                f"{self.bytes_before:,} -> {self.bytes_after:,} weight bytes "
                f"(1/{1 / self.ratio_to_bf16:.2f} of bf16)" if self.bf16_bytes else
                f"converted 0 linear layers ({len(self.skipped)} skipped)")


# Modules whose forward uses their child linears' ``.weight`` tensors instead of calling them
# (MultiheadAttention always; TransformerEncoderLayer in its eval-mode fast path).
_READS_WEIGHT_DIRECTLY = (nn.MultiheadAttention, nn.TransformerEncoderLayer)

SkipSpec = Callable[[str, nn.Linear], bool] | Iterable[str] | str | None


def _skip_fn(skip: SkipSpec) -> Callable[[str, nn.Linear], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert_linear_layers(model: nn.Module, *, skip: SkipSpec = None,
                          eps: float = EPS) -> ConversionReport:
    """Replace every ``nn.Linear`` in ``model`` (in place) by :class:`TernaryLinear`.

    ``skip``: a callable ``(qualified_name, module) -> bool``, or fnmatch patterns matched against
    qualified names (``"head"``, ``"*.adaLN*"``). Linears owned by ``nn.MultiheadAttention`` or
    ``nn.TransformerEncoderLayer`` are always kept (those read ``.weight`` directly) and listed
    in ``report.skipped``. A linear registered under several names is converted once and
    replaced everywhere. Returns a :class:`ConversionReport`; the model is modified in place.
    """
    should_skip = _skip_fn(skip)
    report = ConversionReport()
    replacements: dict[int, TernaryLinear] = {}
    converted_ids: set[int] = set()
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # named_children() dedups
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, TernaryLinear) and id(child) in converted_ids:
                report.converted.append(name)  # a shared parent seen again under another name
                continue
            if not isinstance(child, nn.Linear):
                continue
            if isinstance(parent, _READS_WEIGHT_DIRECTLY):
                report.skipped[name] = (f"inside {type(parent).__name__}, which reads its "
                                        f"linears' .weight directly")
                continue
            if should_skip(name, child):
                report.skipped[name] = "matched skip"
                continue
            if id(child) not in replacements:
                replacements[id(child)] = TernaryLinear.from_linear(child, eps)
                weight = child.weight
                report.bytes_before += weight.numel() * weight.element_size()
                report.bf16_bytes += weight.numel() * 2
                report.bytes_after += replacements[id(child)].weight_nbytes()
                converted_ids.add(id(replacements[id(child)]))
            setattr(parent, child_name, replacements[id(child)])
            report.converted.append(name)
    return report
