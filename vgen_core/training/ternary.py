"""1.58-bit (ternary) generators: quantization-aware layers, self-supervised distillation, export.

Follows 1.58-bit FLUX (Yang et al., 2024) as its paper describes it; its code is not released
(Chenglin-Yang/1.58bit.flux @b3805de: README "working on releasing"), so the details below marked
*choice* are vgen's:

* **Weights** (paper): linear-layer weights become {-1, 0, +1} times a per-output-channel scale,
  BitNet b1.58's absmean quantizer (``kernels.ternary.quantize_ternary``: scale = mean |w| of the
  row, codes = round(w / scale) clipped to [-1, 1]); activations stay in full precision.
* **Kept in full precision** (*choice*, following the paper's "linear layers of the transformer
  blocks"): token / position / class embeddings (not linears), every layer matched by
  :data:`DEFAULT_KEEP` (adaLN modulation, the output head, input projections), and linears inside
  ``nn.MultiheadAttention`` (which reads ``.weight`` directly). Configurable per stage.
* **Self-supervision** (paper: "self-supervision from the full-precision model", no external
  data): the full-precision model samples a pool of its own outputs (class-balanced labels);
  the ternary student is trained so its forward on those samples matches the teacher's. The
  inputs are the family's training inputs built by its own loss function (masking, noise,
  timesteps drawn from the same seed for teacher and student, so both see identical inputs); the
  distillation loss is the mean squared error between the two forwards' outputs (*choice*:
  output matching on the model's own training path works for every label-conditioned family).
* **Training** (*choice*): quantization-aware training with the straight-through estimator
  (:class:`TernaryQATLinear`: the forward uses the quantized weight, gradients reach the latent
  full-precision weight), AdamW, both models in eval mode (no dropout: the two forwards differ
  only by the weights).
* **Export**: :func:`pack_student` gives the deployable model (``kernels.ternary.TernaryLinear``:
  2-bit packed codes + fp32 scales, the Triton kernel on GPU), and :func:`dequantized_student`
  the same model with ordinary ``nn.Linear`` layers holding code x scale, which loads with
  ``load_pretrained`` and evaluates like any generator (same outputs up to fp32 rounding).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.ternary import EPS, ConversionReport, TernaryLinear, quantize_ternary

__all__ = ["TERNARY_VERSION", "DEFAULT_KEEP", "TernaryQATLinear", "to_qat", "pack_student",
           "dequantized_student", "samples_as_batch", "self_distill", "model_bytes"]

#: bump when the quantizer, the distillation or the export change (part of the stage fingerprint)
TERNARY_VERSION = 1
#: qualified-name patterns of linears kept in full precision by default
DEFAULT_KEEP = ("*adaLN*", "*adaln*", "*modulation*", "head*", "*.head*", "*lm_head*",
                "*prediction_layer*", "*input_proj*", "*embed*", "*time*")
_READS_WEIGHT = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


class TernaryQATLinear(nn.Module):
    """A linear layer trained toward ternary weights: ``weight`` (out, in) is the latent full-
    precision parameter; the forward uses ``code x scale`` (absmean, per output row) with a
    straight-through gradient to ``weight``."""

    def __init__(self, linear: nn.Linear, eps: float = EPS):
        super().__init__()
        self.in_features, self.out_features, self.eps = linear.in_features, linear.out_features, eps
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = (nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None
                     else None)

    def quantized_weight(self) -> Tensor:
        """``code x scale`` (out, in) in the weight's dtype, exactly the packed layer's weight."""
        codes, scale = quantize_ternary(self.weight, self.eps)
        return (codes.float() * scale[:, None]).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w_ste = w + (self.quantized_weight() - w).detach()
        return F.linear(x, w_ste, self.bias)


def _replace(model: nn.Module, pick: Callable[[str, nn.Module, nn.Module], nn.Module | None]
             ) -> list[str]:
    done: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = pick(name, parent, child)
            if new is not None:
                setattr(parent, child_name, new)
                done.append(name)
    return done


def to_qat(model: nn.Module,
           keep: Iterable[str] = DEFAULT_KEEP) -> tuple[list[str], dict[str, str]]:
    """Replace ``model``'s ``nn.Linear`` layers (in place) by :class:`TernaryQATLinear`, except
    those matching a ``keep`` pattern or owned by a module that reads ``.weight`` directly.
    Returns (converted names, kept name -> why)."""
    patterns = list(keep)
    kept: dict[str, str] = {}

    def pick(name: str, parent: nn.Module, child: nn.Module) -> nn.Module | None:
        if type(child) is not nn.Linear:
            return None
        if isinstance(parent, _READS_WEIGHT):
            kept[name] = f"inside {type(parent).__name__} (reads .weight directly)"
            return None
        hit = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        if hit is not None:
            kept[name] = f"kept in full precision (matches {hit!r})"
            return None
        return TernaryQATLinear(child)

    return _replace(model, pick), kept


def pack_student(student: nn.Module) -> tuple[nn.Module, ConversionReport]:
    """A copy of ``student`` with every :class:`TernaryQATLinear` packed into a
    ``kernels.ternary.TernaryLinear`` (2 bits per weight + one fp32 scale per row), and the byte
    counts of the converted weights (before: the latent fp32 weights)."""
    packed = copy.deepcopy(student)
    report = ConversionReport()

    def pick(name: str, parent: nn.Module, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, TernaryQATLinear):
            return None
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                           device=child.weight.device, dtype=child.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(child.weight)
            if child.bias is not None:
                linear.bias.copy_(child.bias)
        layer = TernaryLinear.from_linear(linear, child.eps)
        report.bytes_before += child.weight.numel() * child.weight.element_size()
        report.bf16_bytes += child.weight.numel() * 2
        report.bytes_after += layer.weight_nbytes()
        return layer

    report.converted = _replace(packed, pick)
    return packed.eval(), report


def dequantized_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` whose :class:`TernaryQATLinear` layers are plain ``nn.Linear``
    holding ``code x scale``: the family's own module layout, exportable with
    ``save_pretrained`` and evaluated like any generator."""
    out = copy.deepcopy(student)

    def pick(name: str, parent: nn.Module, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, TernaryQATLinear):
            return None
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                           device=child.weight.device, dtype=child.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(child.quantized_weight())
            if child.bias is not None:
                linear.bias.copy_(child.bias)
        return linear

    _replace(out, pick)
    return out.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what inference holds besides activations)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def samples_as_batch(spec: Any, out: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """A training batch of ``spec``'s data kind made of generated samples: token ids as
    ``tokens``; latents as ``moments`` with a (near) zero variance, so the loss's latent draw is
    the sample itself."""
    if spec.output == "tokens":
        return {"tokens": out.reshape(out.shape[0], -1).long(), "label": labels}
    if spec.output == "latents":
        return {"moments": torch.cat([out.float(), torch.full_like(out.float(), -30.0)], dim=1),
                "label": labels}
    raise ValueError(f"model family '{spec.name}' samples {spec.output}; the ternary stage "
                     "distills generators of tokens or latents")


def _outputs(model: nn.Module, spec: Any, batch: dict[str, Tensor], step: int, seed: int,
             loss_options: dict[str, Any]) -> list[Tensor]:
    """The model's forward outputs inside the family's loss on ``batch``, with the loss's random
    draws (masks, noise, timesteps) from ``seed``."""
    got: list[Tensor] = []

    def hook(_m: nn.Module, _i: Any, o: Any) -> None:
        items = o if isinstance(o, (tuple, list)) else (o.values() if isinstance(o, dict) else [o])
        got.extend(t for t in items if isinstance(t, Tensor) and t.is_floating_point())

    handle = model.register_forward_hook(hook)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            spec.loss(model, batch, step, **loss_options)
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"the {spec.name} loss never calls the model's forward; the ternary "
                         "stage matches forward outputs and cannot distill this family")
    return got


def self_distill(teacher: nn.Module, student: nn.Module, spec: Any, pool: dict[str, Tensor], *,
                 steps: int, batch_size: int, lr: float, seed: int,
                 loss_options: dict[str, Any] | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` (with :class:`TernaryQATLinear` layers) to match ``teacher``'s forward
    on batches drawn from ``pool`` (the teacher's own samples as a training batch dict).
    Returns the distillation loss per step."""
    teacher.eval()
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = next(iter(pool.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    options = dict(loss_options or {})
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        batch = {k: v[idx.to(v.device)] for k, v in pool.items()}
        draw = seed * 1_000_003 + step
        with torch.no_grad():
            want = _outputs(teacher, spec, batch, step, draw, options)
        have = _outputs(student, spec, batch, step, draw, options)
        if len(have) != len(want):
            raise ValueError(f"the {spec.name} loss called the two models a different number "
                             "of times; cannot pair their outputs")
        loss = torch.stack([F.mse_loss(h.float(), w.float()) for h, w in zip(have, want)]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
