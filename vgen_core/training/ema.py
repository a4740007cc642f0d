"""Exponential moving average (EMA) of model weights; the exported weights when it is on.

After each optimizer step ``shadow = d * shadow + (1 - d) * value`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the warmup timm and diffusers use, so
a short run is not dominated by its initial weights). The shadow is kept in fp32 whatever the
training precision.

Which tensors are averaged is the caller's choice, given as a ``{name: tensor}`` mapping each
time: a module's parameters (ZeRO 0-2, where a rank holds the full weights) or one rank's ZeRO-3
partitions. ``applied`` swaps the averages into those tensors for an export, then restores them.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator, Mapping

import torch

__all__ = ["EMA"]


class EMA:
    """EMA of named tensors. ``decay`` in (0, 1); ``warmup`` applies the (1+n)/(10+n) ramp."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float, *, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}; use 0 in the config "
                             "(train.ema_decay) to turn the EMA off")
        self.decay, self.warmup = float(decay), warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in tensors.items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fold the current values of the tracked tensors into the averages."""
        self._check_names(tensors)
        weight = 1.0 - self.current_decay()
        for k, s in self.shadow.items():
            s.lerp_(tensors[k].detach().to(s.device, torch.float32), weight)
        self.num_updates += 1

    @contextmanager
    def applied(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, ``tensors`` hold the averages (cast to their dtype); restored after."""
        self._check_names(tensors)
        backup = {k: t.detach().clone() for k, t in tensors.items()}
        try:
            with torch.no_grad():
                for k, t in tensors.items():
                    t.copy_(self.shadow[k].to(t.device, t.dtype))
            yield
        finally:
            with torch.no_grad():
                for k, t in tensors.items():
                    t.copy_(backup[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages plus ``num_updates`` as a 0-d int64 tensor (safetensors-friendly)."""
        state = {f"shadow.{k}": v.detach().cpu().contiguous() for k, v in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.shadow):
            raise ValueError(f"EMA state does not match the model: missing "
                             f"{sorted(set(self.shadow) - names)[:5]}, unexpected "
                             f"{sorted(names - set(self.shadow))[:5]}")
        for k, s in self.shadow.items():
            s.copy_(state[f"shadow.{k}"].to(s.device, torch.float32))
        self.num_updates = int(state["num_updates"])

    def _check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) - set(tensors))
            raise KeyError(f"EMA tracks {len(self.shadow)} tensors; got {len(tensors)} "
                           f"(missing: {missing[:5]})")
