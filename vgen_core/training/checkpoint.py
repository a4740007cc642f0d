"""What a training worker saves beside DeepSpeed's checkpoint, how it is loaded back safely, and
the resume arithmetic.

One checkpoint is one directory, merged from every rank (Ray Train merges the ranks' reports):

    ds/                          DeepSpeed's checkpoint (``engine.save_checkpoint``, tag ``ds``):
                                 weights, optimizer (ZeRO shards per rank), engine counters
    vgen_rank{r}.json            rank r: optimizer step, data position, numpy RNG, restore count,
                                 the last logged metrics
    vgen_rank{r}.safetensors     rank r: torch RNG state(s), the EMA this rank holds
    vgen_manifest_rank{r}.json   rank r: the SHA-256 and size of every file rank r wrote

A checkpoint lives in a shared storage root, so it is not trusted when read back
(:func:`restore_checkpoint`): every file must match the digest its rank recorded at save, every
file under ``ds/`` and every ``vgen_rank*`` file must be listed, and DeepSpeed's files (torch
pickles) are read weights-only (:mod:`vgen_core.training.safe_load`): tensors and a short
allow-list of DeepSpeed classes, never arbitrary objects. Everything else is JSON or safetensors;
exported models are safetensors only. The manifests catch a checkpoint changed or corrupted after
its save; they sit beside it, so it is the weights-only load that stops a deliberately planted
pickle.

Resume: a worker restored at optimizer step ``s`` runs steps ``s+1 .. steps``; it logs a step only
if it is past both ``s`` and the last step the tracking run already holds (a step between the
checkpoint and the crash was logged by the attempt that crashed), so each step appears once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .safe_load import _FIX, CheckpointRejected, weights_only_loads

__all__ = ["DS_TAG", "CheckpointRejected", "WorkerState", "checkpoint_due", "log_floor",
           "save_checkpoint", "restore_checkpoint", "save_worker_state", "load_worker_state",
           "write_manifest", "verify_manifest", "scan_checkpoint", "rng_tensors", "restore_rng"]

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


_MANIFEST = re.compile(r"vgen_manifest_rank\d+\.json")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` as a '/'-separated relative path, manifests left out."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if not _MANIFEST.fullmatch(rel):
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str, rank: int) -> str:
    """Record the SHA-256 and size of every file in ``directory`` (what rank ``rank`` wrote) in
    ``vgen_manifest_rank{rank}.json``; returns its path. Call it last."""
    files = {rel: {"sha256": _sha256(os.path.join(directory, rel)),
                   "bytes": os.path.getsize(os.path.join(directory, rel))}
             for rel in _files(directory)}
    path = os.path.join(directory, f"vgen_manifest_rank{rank}.json")
    with open(path, "w") as f:
        json.dump({"format": 1, "rank": rank, "algorithm": "sha256", "files": files}, f, indent=1)
    return path


def _expected(directory: str, where: str) -> dict[str, tuple[str, str]]:
    """Path -> (sha256, manifest naming it), merged over the ranks' manifests."""
    names = sorted(n for n in os.listdir(directory) if _MANIFEST.fullmatch(n))
    if not names:
        raise CheckpointRejected(
            f"checkpoint {where} has no digest manifest (vgen_manifest_rank*.json): it was written "
            f"by an older vgen or by other code, and vgen loads only checkpoints whose files it "
            f"can verify; {_FIX}")
    expected: dict[str, tuple[str, str]] = {}
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                files = json.load(f)["files"]
            entries = {rel: e["sha256"] for rel, e in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointRejected(f"checkpoint {where}: manifest {name} is unreadable "
                                     f"({err!r}); {_FIX}") from None
        for rel, digest in entries.items():
            if rel.startswith("/") or ".." in rel.split("/") or _MANIFEST.fullmatch(rel):
                raise CheckpointRejected(f"checkpoint {where}: manifest {name} lists '{rel}', "
                                         f"which is not a file of the checkpoint; {_FIX}")
            if rel in expected and expected[rel][0] != digest:
                raise CheckpointRejected(
                    f"checkpoint {where}: {rel} has two recorded digests, {expected[rel][0]} "
                    f"({expected[rel][1]}) and {digest} ({name}); {_FIX}")
            expected[rel] = (digest, name)
    return expected


def verify_manifest(directory: str, where: str | None = None) -> None:
    """Refuse (:class:`CheckpointRejected`) a checkpoint whose files do not match the digests
    recorded at save, or with a DeepSpeed or vgen state file no manifest lists. ``where`` names
    the checkpoint in messages (its storage path; ``directory`` may be a local copy)."""
    where = where or directory
    expected = _expected(directory, where)
    present = _files(directory)
    unlisted = [rel for rel in present if rel not in expected
                and rel.startswith((f"{DS_TAG}/", "vgen_rank"))]
    if unlisted:
        raise CheckpointRejected(
            f"checkpoint {where}: {unlisted[0]} is in no manifest (unlisted: {unlisted}): it was "
            f"added after the checkpoint was saved; {_FIX}")
    for rel, (digest, name) in sorted(expected.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointRejected(f"checkpoint {where}: {rel}, listed in {name}, is missing; "
                                     f"{_FIX}")
        actual = _sha256(path)
        if actual != digest:
            raise CheckpointRejected(
                f"checkpoint {where}: {rel} was changed after it was saved: sha256 expected "
                f"{digest} ({name}), actual {actual}; vgen does not load it: {_FIX}")


def save_checkpoint(engine: Any, directory: str, rank: int, state: WorkerState,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Collective: rank ``rank``'s part of a checkpoint into ``directory``: DeepSpeed's files, the
    worker state, then the manifest of all of them."""
    engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False)
    save_worker_state(directory, rank, state, tensors)
    write_manifest(directory, rank)


def restore_checkpoint(engine: Any, directory: str, rank: int, where: str | None = None,
                       ) -> tuple[WorkerState, dict[str, torch.Tensor]]:
    """Collective: verify the checkpoint in ``directory`` against its manifests, load DeepSpeed's
    part into ``engine`` weights-only, and return rank ``rank``'s worker state and tensors.
    Raises :class:`CheckpointRejected` (naming ``where``) rather than load anything unverified."""
    where = where or directory
    verify_manifest(directory, where)
    try:
        with weights_only_loads(engine):
            path, _ = engine.load_checkpoint(directory, tag=DS_TAG,
                                             load_lr_scheduler_states=False)
    except CheckpointRejected as err:
        raise CheckpointRejected(f"checkpoint {where}: {err}") from None
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint '{DS_TAG}' in {where}")
    return load_worker_state(directory, rank)


def scan_checkpoint(directory: str, where: str | None = None) -> None:
    """What a restore would refuse, found without loading anything: the manifests
    (:func:`verify_manifest`) and, in every DeepSpeed file, a pickled global that is neither a
    tensor type nor one of the allowed DeepSpeed classes (read from the pickle's opcodes by
    ``torch.serialization.get_unsafe_globals_in_checkpoint``). Raises
    :class:`CheckpointRejected`. The train stage runs it on the driver before Ray Train restores a
    checkpoint, so a refused one fails the stage once, with the fix, instead of failing every
    restarted worker group up to ``max_failures``."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from .safe_load import deepspeed_allowed

    where = where or directory
    verify_manifest(directory, where)
    allowed = {f"{c.__module__}.{c.__name__}" for c in deepspeed_allowed()}
    for rel in _files(directory):
        if not rel.startswith(f"{DS_TAG}/"):
            continue
        try:
            found = set(get_unsafe_globals_in_checkpoint(os.path.join(directory, rel)))
        except Exception as e:  # not a torch file at all
            raise CheckpointRejected(f"checkpoint {where}: {rel} is not a readable torch file "
                                     f"({type(e).__name__}: {e}); {_FIX}") from None
        if found - allowed:
            raise CheckpointRejected(
                f"checkpoint {where}: {rel} holds objects vgen does not load "
                f"({', '.join(sorted(found - allowed))}); only tensors and {sorted(allowed)} are "
                f"allowed; nothing was run; {_FIX}")
