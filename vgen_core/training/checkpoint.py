"""What a training worker saves beside DeepSpeed's checkpoint, and the resume arithmetic.

One checkpoint is one directory, merged from every rank (Ray Train merges the ranks' reports):

    ds/                          DeepSpeed's checkpoint (``engine.save_checkpoint``, tag ``ds``):
                                 weights, optimizer (ZeRO shards per rank), engine counters
    vgen_rank{r}.json            rank r: optimizer step, data position, numpy RNG, restore count,
                                 the last logged metrics
    vgen_rank{r}.safetensors     rank r: torch RNG state(s), the EMA this rank holds

DeepSpeed's files are torch pickles: we wrote them into our own storage and only ever load our
own; everything else here is JSON or safetensors. Exported models are safetensors only.

Resume: a worker restored at optimizer step ``s`` runs steps ``s+1 .. steps``; it logs a step only
if it is past both ``s`` and the last step the tracking run already holds (a step between the
checkpoint and the crash was logged by the attempt that crashed), so each step appears once.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["DS_TAG", "WorkerState", "checkpoint_due", "log_floor", "save_worker_state",
           "load_worker_state", "rng_tensors", "restore_rng"]

#: DeepSpeed tag of the one checkpoint a directory holds.
DS_TAG = "ds"


@dataclass
class WorkerState:
    """A rank's progress at a checkpoint. ``epoch``/``batch`` is the data position: micro-batches
    consumed in the current pass over this rank's shard."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    restores: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    numpy_rng: dict[str, Any] | None = None


def checkpoint_due(step: int, every: int, total: int) -> bool:
    """Save after optimizer step ``step`` (1-based)? Every ``every`` steps and after the last;
    never when ``every`` is 0."""
    return every > 0 and (step % every == 0 or step == total)


def log_floor(resumed_step: int, logged_through: int | None) -> int:
    """Steps at or below this were logged already (by this attempt's predecessors)."""
    return max(resumed_step, logged_through or 0)


def rng_tensors(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's torch RNG state(s) as uint8 tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
    if "rng.cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"].to(torch.uint8), device)


def _paths(directory: str, rank: int) -> tuple[str, str]:
    base = os.path.join(directory, f"vgen_rank{rank}")
    return base + ".json", base + ".safetensors"


def save_worker_state(directory: str, rank: int, state: WorkerState,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Write rank ``rank``'s JSON and safetensors files into ``directory``."""
    from safetensors.torch import save_file

    js, st = _paths(directory, rank)
    with open(js, "w") as f:
        json.dump(asdict(state), f)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, st)


def load_worker_state(directory: str, rank: int) -> tuple[WorkerState, dict[str, torch.Tensor]]:
    """Read what ``save_worker_state`` wrote for ``rank``."""
    from safetensors.torch import load_file

    js, st = _paths(directory, rank)
    if not os.path.exists(js):
        have = sorted(n for n in os.listdir(directory) if n.startswith("vgen_rank"))
        raise FileNotFoundError(
            f"checkpoint {directory} has no state for rank {rank} (has: {have}); it was written "
            "by a run with another number of workers: resume with the same resources.workers")
    with open(js) as f:
        state = WorkerState(**json.load(f))
    return state, load_file(st)
