"""Deterministic fault injection for crash tests: ``fault_point(name)`` SIGKILLs its own process
when the environment asks for it, and does nothing otherwise.

``VGEN_FAULT=<point>[:<n>]`` kills the process the ``n``-th time (default 1) it reaches the fault
point ``<point>``; several faults may be given, comma-separated (the first one reached fires).
The kill is ``os.kill(os.getpid(), SIGKILL)``: no ``finally``, no ``atexit``, no flush, exactly
what a power cut or the OOM killer does to that process. The environment is read once, at
import; without ``VGEN_FAULT`` a fault point is one global lookup and a comparison.

``VGEN_FAULT_ONCE=<path>`` makes the fault fire in one process only, across processes and
machines that share the path: the process that fires first creates ``<path>`` (``O_EXCL``) and
every process that finds it existing goes on. That is for points reached by processes that get
restarted with the same environment (a Ray Train worker group restarted by ``FailureConfig``:
without it each restarted worker would die again at its ``n``-th checkpoint).

``vgen run`` passes ``VGEN_FAULT*`` to its Ray workers (the job's ``runtime_env``), so points in
worker code fire there. Fault points (``grep -rn fault_point pipelines vgen_core``):

driver, per-sample stages (``pipelines/stages/base.py``, ``MapStage.run`` / ``SourceStage``), once
per chunk commit:

- ``before_data_commit``: a chunk's output rows are about to be committed (nothing written)
- ``after_data_commit``: the rows are committed; the chunk's quarantine rows and its sources
  record are not
- ``after_quarantine_commit``: the chunk's quarantine rows are committed; its sources record
  is not
- ``before_sources_record``: rows and quarantine are committed, the items' sources record is not
- ``after_sources_record``: the whole chunk is committed and recorded (between chunks)
- ``before_source_delete``: a source stage is about to delete the rows / records of vanished
  items (``SourceStage.finalize``, one hit per DELETE commit)

storage (``vgen_core/data/store.py``), every ``TableStore.append`` / ``upsert`` / ``delete``,
whatever the table (stage outputs, quarantine, sources records, ``_vgen/stage_runs``):
``before_table_commit``, ``after_table_commit``. ``after_table_commit:<n>`` therefore sweeps
every commit of a run in order.

runner (``pipelines/dag/runner.py``): ``after_stage_started`` (the "started" record is written,
nothing else), ``before_stage_completed`` (the stage's outputs are all committed, the runner has
not recorded it completed), ``after_stage_completed``.

training (``pipelines/stages/train.py``, in each Ray Train worker): ``in_checkpoint_save`` (the
DeepSpeed checkpoint is half made: written to a local temp dir, not reported to Ray Train),
``after_checkpoint_report`` (reported).

Examples::

    VGEN_FAULT=after_data_commit:2 vgen run dag.yaml        # dies (-9) at the 2nd data commit
    vgen run dag.yaml                                        # the re-run: every sample once
    VGEN_FAULT=in_checkpoint_save:2 VGEN_FAULT_ONCE=/tmp/ckpt-fault vgen run train.yaml

The tests that use them: ``tests/e2e/test_chaos.py`` (one kill per point, then a re-run, then
exactly-once checks against a clean run) and ``tests/e2e/test_soak.py``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["fault_point", "FaultSpecError", "parse_spec", "reload"]

ENV, ENV_ONCE = "VGEN_FAULT", "VGEN_FAULT_ONCE"


class FaultSpecError(ValueError):
    """``VGEN_FAULT`` is malformed."""


def parse_spec(spec: str) -> dict[str, int]:
    """``"a:2,b"`` -> ``{"a": 2, "b": 1}`` (point -> the hit that fires)."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, n = part.rpartition(":")
        if not sep:
            name, n = part, "1"
        if not name or not n.isdigit() or int(n) < 1:
            raise FaultSpecError(f"{ENV}={spec!r}: each fault is <point>[:<n>] with n >= 1 "
                                 f"(e.g. after_data_commit:2), got {part!r}")
        out[name] = int(n)
    return out


_targets: dict[str, int] = {}
_hits: dict[str, int] = {}
_once: str | None = None
_lock = threading.Lock()


def reload() -> None:
    """Read ``VGEN_FAULT`` / ``VGEN_FAULT_ONCE`` again and reset the hit counts (tests)."""
    global _targets, _once
    _targets = parse_spec(os.environ.get(ENV, ""))
    _once = os.environ.get(ENV_ONCE) or None
    _hits.clear()


def fault_point(name: str) -> None:
    """SIGKILL this process if ``VGEN_FAULT`` names ``name`` and this is its n-th hit here."""
    if not _targets or name not in _targets:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != _targets[name]:
            return
        if _once is not None:
            try:
                os.close(os.open(_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return  # another process already took this fault
        print(f"[vgen.faults] {ENV}: SIGKILL at {name} (hit {_hits[name]}, pid {os.getpid()})",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


reload()
