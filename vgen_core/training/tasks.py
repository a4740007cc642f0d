"""Trainable model families, as the train stage sees them: a thin view of :mod:`vgen_core.families`.

A family's :class:`~vgen_core.families.FamilySpec` holds its config registry, builder, the data it
eats (``data``, see the table in :mod:`vgen_core.families`) and its batch-level loss
``loss(model, batch, step, **options) -> (loss, metrics)``; ``options`` come from the train
stage's ``loss:`` mapping (e.g. RAR's ``anneal_start``/``anneal_end``). ``get_task(name)`` is that
spec, refused with the trainable families listed when the family has no loss.

Tokenizer losses are the reconstruction and quantizer terms of methods.md §1 (L2 / L1 plus the
VQ commitment+codebook, LFQ commitment+entropy, or KL terms); the perceptual (LPIPS, ConvNeXt),
CLIP-alignment, Gram and GAN terms need pretrained networks that cannot be downloaded here and
are not part of these losses (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from vgen_core import families
from vgen_core.families import FamilySpec, to_model_pixels

__all__ = ["Task", "TASKS", "get_task", "images_to_model", "images_to_unit"]

#: a trainable family (kept as a name: the train stage's word for it)
Task = FamilySpec


def images_to_model(image_BHWC: torch.Tensor, family: str | FamilySpec) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in ``family``'s pixel range (the one its loss,
    tokenize and evaluate stages use: :func:`vgen_core.families.pixel_range_of`)."""
    spec = family if isinstance(family, FamilySpec) else families.get(family)
    return to_model_pixels(image_BHWC, families.pixel_range_of(spec))


def images_to_unit(image_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return to_model_pixels(image_BHWC, "unit")


def get_task(family: str) -> FamilySpec:
    """The trainable family ``family`` (a name or alias, e.g. ``maskgen``)."""
    spec = families.find(family)
    if spec is None or "train" not in spec.capabilities:
        raise ValueError(f"model family {family!r} not found among the trainable families; "
                         f"known: {', '.join(TASKS)}")
    return spec


class _Tasks(Mapping):
    """``{name: spec}`` of every trainable family, aliases included (read lazily)."""

    def _all(self) -> dict[str, FamilySpec]:
        out = {}
        for s in families.all_specs():
            if "train" in s.capabilities:
                out[s.name] = s
                out.update({a: s for a in s.aliases})
        return out

    def __getitem__(self, key: str) -> FamilySpec:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


TASKS: Mapping[str, FamilySpec] = _Tasks()
