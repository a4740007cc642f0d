"""Loading DeepSpeed's checkpoint files without unpickling arbitrary objects.

DeepSpeed saves its checkpoint with ``torch.save`` (a pickle) and its checkpoint engine reads it
back with ``torch.load(weights_only=False)``: a file planted in the storage root would run code on
every training worker that resumes from it. Inside :func:`weights_only_loads` every ``torch.load``
is a weights-only load: tensors, containers and primitives, plus the few DeepSpeed classes its
checkpoint dicts hold (:func:`deepspeed_allowed`, found by saving ZeRO 0-3 checkpoints in fp32 and
bf16 and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``). Anything else fails
before it is built, with :class:`CheckpointRejected` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["CheckpointRejected", "deepspeed_allowed", "weights_only_loads"]

_FIX = ("delete the Ray Train run directory that holds this checkpoint (under "
        "<storage>/ray_train/) so the stage trains afresh, and re-run")
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointRejected(RuntimeError):
    """A stored checkpoint vgen will not load (tampered with, corrupt, or not vgen's)."""


def deepspeed_allowed() -> list[type]:
    """The non-tensor classes a DeepSpeed checkpoint holds (DeepSpeed 0.19): the ZeRO stage of an
    optimizer file, its loss scaler (static; dynamic with fp16, a CUDA-only precision), and the
    flat-partition addresses of ZeRO 1/2 and the bf16 optimizer. Model files hold only tensors,
    dicts, lists, strings and numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _rejected(path: str, err: Exception) -> CheckpointRejected:
    allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in deepspeed_allowed())
    lines = str(err).strip().splitlines()
    why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
               lines[0] if lines else type(err).__name__).strip().rstrip(".")
    return CheckpointRejected(
        f"{path}: refused to load: it holds an object that is neither a tensor nor one of the "
        f"DeepSpeed classes vgen allows ({allowed}): {why}. A checkpoint vgen wrote holds none, "
        "so this file was replaced or written by other code (or another DeepSpeed version); "
        f"nothing in it was run; {_FIX}")


class _WeightsOnlyEngine:
    """A DeepSpeed checkpoint engine whose ``load`` is weights-only; everything else is the
    wrapped engine's."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _rejected(path, err) from None


@contextlib.contextmanager
def weights_only_loads(engine: Any = None) -> Iterator[None]:
    """Within: ``engine``'s checkpoint engine loads weights-only, and so does any other
    ``torch.load`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, for DeepSpeed paths that bypass the
    checkpoint engine), with :func:`deepspeed_allowed` as the only extra classes."""
    saved_env = {k: os.environ.pop(k, None) for k in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is not None:
        engine.checkpoint_engine = _WeightsOnlyEngine(inner)
    try:
        # a new list, typed as safe_globals' list[Callable | ...] (list is invariant)
        with torch.serialization.safe_globals([*deepspeed_allowed()]):
            yield
    except pickle.UnpicklingError as err:
        raise _rejected("a DeepSpeed checkpoint file", err) from None
    finally:
        if inner is not None:
            engine.checkpoint_engine = inner
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
