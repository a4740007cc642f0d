"""The runner: the driver of one Ray job that executes a DAG.

1. Validate the DAG (done by the loader), check what every stage's config points at (data roots,
   weights files: :func:`planner.require_valid_config`, a :class:`planner.ConfigErrors` naming
   the file, stage and field), then that the storage root is writable: before Ray starts, before
   the MLflow run is opened (``vgen run`` checks before creating it) and before any write.
2. Connect to Ray when the work needs it (:class:`LazyRay`, once per run): at once for an
   existing cluster (``address`` / ``RAY_ADDRESS``: its resources size the schedule) or when a
   stage asks for GPUs; else an embedded local Ray sized to this machine starts only when a stage
   first needs it: a Ray Train stage, or work bigger than the DAG's ``in_process_rows``, which
   runs in the driver (:class:`~pipelines.dag.ray_exec.RayDataExecutor`). A no-op run, or a re-run
   whose to-do is small, starts no Ray at all.
3. Open one MLflow run for the DAG run (params = the resolved DAG); each stage that runs gets a
   nested run with its counts, metrics and tables (as MLflow dataset inputs with Delta versions).
   A stage kind with ``resumes_tracking`` (training) that continues an interrupted attempt of the
   same fingerprint gets that attempt's run back instead, so its step history continues.
4. Schedule stages as their upstream stages finish. Independent branches run concurrently, each
   in a driver thread, admitted only while the CPUs they declare fit in the cluster, so a DAG on
   a 2-core machine runs branches one after the other instead of starving.
5. Each stage is re-planned right before it runs (:func:`planner.plan_stage`): up-to-date stages
   are skipped, partial ones continue, others run. State goes to ``_vgen/stage_runs``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from pipelines.console import Console
from pipelines.stages import get_kind
from pipelines.stages.base import Counts, OutputRef, StageError
from vgen_core.faults import fault_point
from vgen_core.tracking.redact import redact_text

from .planner import UP_TO_DATE, plan_dag, plan_stage, require_valid_config
from .spec import Dag
from .state import StageState

log = logging.getLogger("vgen.runner")

__all__ = ["Runner", "StageOutcome", "RunSummary", "connect_ray", "LazyRay", "in_process_rows"]


@dataclass
class StageOutcome:
    stage: str
    kind: str
    action: str  # ran | skipped | failed | blocked
    reason: str = ""
    counts: Counts = field(default_factory=Counts)
    outputs: dict[str, OutputRef] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunSummary:
    dag: str
    storage: str
    tracking_uri: str
    run_id: str | None
    outcomes: dict[str, StageOutcome]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.action in ("ran", "skipped") for o in self.outcomes.values())


def connect_ray(address: str | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "DS_BUILD_OPS",
                                                    "PYTHONPATH") if k in os.environ}}
    env["env_vars"].update({k: v for k, v in os.environ.items() if k.startswith("VGEN_FAULT")})
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # The embedded Ray listens on loopback only. Ray 2.60 binds its gRPC servers (GCS, raylet,
    # object manager, workers) and agents to all interfaces unless the node IP is 127.0.0.1, and
    # turns a `_node_ip_address="127.0.0.1"` into the machine's routable IP, except in a
    # single-machine Ray (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what Ray does on macOS and Windows;
    # read once, at import, into ray_constants). Both are set while ray.init starts the
    # processes, which inherit the variable; tests/e2e/test_local_bind.py checks the sockets.
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, runtime_env=env,
                 log_to_driver=True, _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved[0]


def in_process_rows(dag: Dag) -> int:
    """The DAG's ``in_process_rows``, or ``VGEN_IN_PROCESS_ROWS`` when set (an operator's knob:
    0 sends every stage's work to Ray)."""
    env = os.environ.get("VGEN_IN_PROCESS_ROWS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"VGEN_IN_PROCESS_ROWS={env!r}: expected a whole number of rows "
                             "(0 sends all work to Ray)") from None
        if value < 0:
            raise ValueError(f"VGEN_IN_PROCESS_ROWS={env!r}: expected 0 or more rows")
        return value
    return int(dag.spec.in_process_rows)


_owner: tuple[threading.Thread, Any] | None = None
_owner_lock = threading.Lock()


def _on_lasting_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on the main thread or on one thread that lives as long as the process.

    An embedded Ray's head processes (GCS, raylet) are started with ``PR_SET_PDEATHSIG=SIGKILL``,
    which Linux delivers when the *thread* that started them exits, not the process. Started
    from a stage thread of the runner's pool, they were killed when the pool's threads ended at
    the end of the DAG; ``ray.shutdown()`` then waited ~20 s on a dead GCS and raylet (task
    events, metrics export timeouts): most of the time after a full run, measured on
    2,000 images: DAG 13.1 s, ~35 s in all (ray.shutdown ~21 s). Calls from other threads
    are handed to a daemon thread that serves them until the process exits."""
    if threading.current_thread() is threading.main_thread():
        return fn(*args)
    global _owner
    import queue

    with _owner_lock:
        if _owner is None or not _owner[0].is_alive():
            work: queue.Queue = queue.Queue()

            def serve() -> None:
                while True:
                    call, cargs, done = work.get()
                    try:
                        done.set_result(call(*cargs))
                    except BaseException as e:
                        done.set_exception(e)

            thread = threading.Thread(target=serve, name="vgen-ray-owner", daemon=True)
            thread.start()
            _owner = (thread, work)
        done: Future = Future()
        _owner[1].put((fn, args, done))
    return done.result()


class LazyRay:
    """Ray for one DAG run, connected (or started, embedded) the first time something needs it,
    from any of the runner's stage threads; :meth:`ensure` returns the cluster's resources."""

    def __init__(self, address: str | None, console: Any = None):
        self.address = address
        self.console = console
        self.cluster: dict[str, float] | None = None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self.cluster is not None

    def ensure(self) -> dict[str, float]:
        with self._lock:
            if self.cluster is None:
                t0 = time.time()
                embedded = not (self.address or os.environ.get("RAY_ADDRESS"))
                _on_lasting_thread(connect_ray, self.address)
                from .ray_exec import cluster_resources

                self.cluster = cluster_resources()
                if self.console is not None:
                    self.console.print(f"Ray {'started' if embedded else 'connected'} in "
                                       f"{time.time() - t0:.1f}s")
            return self.cluster


def _warm_imports(dag: Dag, plans: list | None) -> None:
    """Import what the stages to run will import (``Stage.warm_imports``: torch) on a daemon
    thread, now: the import (~1.5 s of torch on 2 cores) then overlaps the stages before them
    and their waits (a commit, the tracking process's first run id) instead of delaying the first
    stage that needs it. Python's import lock makes that stage wait for a half-done import
    rather than import twice."""
    import importlib

    to_run = {p.stage for p in plans if p.state != UP_TO_DATE} if plans is not None \
        else set(dag.order)
    modules: list[str] = []
    for name in dag.order:
        if name in to_run:
            try:
                cls = get_kind(dag.stage(name).uses)
            except Exception:  # an unknown kind fails where it is planned, not here
                continue
            modules += [m for m in getattr(cls, "warm_imports", ()) if m not in modules]
    modules = [m for m in modules if m not in sys.modules]

    def warm() -> None:
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:
                continue

    if modules:
        threading.Thread(target=warm, name="vgen-warm-imports", daemon=True).start()


def _known_run_id(tracker: Any) -> str | None:
    """The tracker's run id without waiting: a `SidecarTracker` whose run the tracking process
    has not created yet gives None."""
    if hasattr(type(tracker), "known_run_id"):
        return tracker.known_run_id
    return tracker.run_id


class Runner:
    def __init__(self, dag: Dag, store: Any, tracker: Any, tracking_uri: str, *,
                 address: str | None = None, executor: str = "ray", stream=None,
                 verify_sources: bool = False, console: Any = None, log_path: str | None = None):
        self.dag, self.store, self.tracker = dag, store, tracker
        #: source stages compare file contents, not sizes + mtimes (``vgen run --verify-sources``)
        self.verify_sources = verify_sources
        self.tracking_uri, self.address, self.executor = tracking_uri, address, executor
        self.state = StageState(store)
        # vgen's own lines (pipelines.console); stream: looked up now, a test may swap sys.stderr
        self.console = console or Console(stream or sys.stderr)
        #: where library output and tracebacks go (`vgen run` prints it; None: not captured)
        self.log_path = log_path

    # ---------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        t0 = time.time()
        try:
            require_valid_config(self.dag, self.store)  # nothing started or written yet
            self.in_process_rows = in_process_rows(self.dag)  # a bad VGEN_IN_PROCESS_ROWS
        except Exception:
            self.tracker.finish("FAILED")  # a caller's already-open run does not stay open
            raise
        self.store.check_writable()
        self.ray = LazyRay(self.address, self.console)
        # the embedded Ray would see this machine's CPUs; its GPUs matter only to a stage that
        # asks for some, and such a DAG connects at once (below)
        cluster = {"CPU": float(os.cpu_count() or 2), "GPU": 0.0}
        plans = self._plan_all()
        noop = plans is not None and all(p.state == UP_TO_DATE for p in plans)
        if not noop:
            _warm_imports(self.dag, plans)
        wants_gpu = any(float(self.dag.stage(n).resources.gpus or 0) > 0 for n in self.dag.order)
        if self.executor == "ray" and not noop and (
                wants_gpu or self.address or os.environ.get("RAY_ADDRESS")):
            cluster = self.ray.ensure()  # a cluster's own resources size the schedule
        self.cluster = cluster
        self.tracker.log_params(self.dag.resolved())
        self.tracker.set_tags({"vgen.dag": self.dag.name, "vgen.storage": self.store.root,
                               "vgen.dag_file": self.dag.source})
        if plans is not None and noop:  # the plan is the answer: nothing to run, nothing re-read
            outcomes = {}
            for p in plans:
                self.console.print(f"[{p.stage}] up-to-date: skipped ({p.reason})")
                outcomes[p.stage] = StageOutcome(p.stage, p.kind, "skipped", p.reason,
                                                 outputs=p.outputs)
        else:
            outcomes = self._schedule()
        summary = RunSummary(self.dag.name, self.store.root, self.tracking_uri,
                             self.tracker.run_id, {n: outcomes[n] for n in self.dag.order},
                             time.time() - t0)
        if not noop:  # the stage records read by every plan stay a few files
            try:
                self.state.compact()
            except Exception as e:  # an optimisation: never a failed run
                log.info("could not compact the stage records (%s); the next run tries again",
                            e)
        self.tracker.log_metrics(
            {
                "dag.seconds": summary.seconds,
                "dag.stages_ran": sum(o.action == "ran" for o in outcomes.values()),
                "dag.stages_skipped": sum(o.action == "skipped" for o in outcomes.values()),
            }
        )
        self.tracker.finish("FINISHED" if summary.ok else "FAILED")
        return summary

    def _plan_all(self) -> list | None:
        """The whole DAG's plan (None if planning failed: each stage then reports its own error
        when it is planned again right before it runs)."""
        try:
            return plan_dag(
                self.dag,
                self.store,
                self.state,
                problems={},  # checked in run()
                verify_sources=self.verify_sources,
                count_work=False,  # the states decide a no-op; each stage counts when it runs
            )
        except Exception:
            return None

    def _schedule(self) -> dict[str, StageOutcome]:
        """Run stages as their upstream stages finish (see the module docstring)."""
        cluster = self.cluster
        last, done = self.state.latest(self.dag.name)
        outcomes: dict[str, StageOutcome] = {}
        fps: dict[str, str] = {}
        pending = list(self.dag.order)
        running: dict[Future, str] = {}
        used_cpus = 0.0
        with ThreadPoolExecutor(max_workers=max(1, len(pending))) as pool:
            while pending or running:
                started = False
                for name in list(pending):
                    needs = self.dag.stage(name).needs
                    if any(u not in outcomes for u in needs):
                        continue
                    bad = [u for u in needs if outcomes[u].action in ("failed", "blocked")]
                    if bad:
                        pending.remove(name)
                        outcomes[name] = StageOutcome(
                            name,
                            self.dag.stage(name).uses,
                            "blocked",
                            reason=f"upstream {', '.join(bad)} failed",
                        )
                        started = True
                        continue
                    demand = self._cpu_demand(name)
                    if running and used_cpus + demand > cluster["CPU"]:
                        continue
                    pending.remove(name)
                    used_cpus += demand
                    inputs = {u: outcomes[u].outputs for u in needs}
                    fut = pool.submit(
                        self._run_stage,
                        name,
                        inputs,
                        {u: fps[u] for u in needs},
                        last.get(name),
                        done.get(name),
                    )
                    running[fut] = name
                    started = True
                if not running:
                    if pending and not started:
                        raise RuntimeError(f"scheduler stuck with pending stages {pending}")
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    used_cpus -= self._cpu_demand(name)
                    outcomes[name], fps[name] = fut.result()
        return outcomes

    def _stage_tracker(self, name: str, stage: Any, fingerprint: str, last: dict | None) -> Any:
        """A new nested run for the stage; or, for a stage kind that resumes its work
        (``resumes_tracking``, e.g. training from its checkpoints) after an attempt of the same
        fingerprint that did not complete, that attempt's run, so its step history continues."""
        prev = None
        if (
            getattr(stage, "resumes_tracking", False)
            and last is not None
            and last["fingerprint"] == fingerprint
            and last["status"] != "completed"
        ):
            prev = last.get("mlflow_run_id")
        resumed = self._reattach(prev) if prev else None
        if resumed is None:
            return self.tracker.child(name)
        self.console.print(f"[{name}] continues MLflow run {prev}")
        resumed.set_tags({"vgen.resumed_in_dag_run": self.tracker.run_id})
        return resumed

    def _reattach(self, run_id: str) -> Any:
        """This DAG run's tracker type reopened on an earlier run (None if it cannot be:
        `MlflowTracker.reattach`, `SidecarTracker.reattach`; a NullTracker has none)."""
        reattach = getattr(self.tracker, "reattach", None)
        if reattach is None or run_id.startswith("offline-"):
            return None
        return reattach(run_id)

    def _cpu_demand(self, name: str) -> float:
        res = self.dag.stage(name).resources
        cpu_total = self.cluster["CPU"]
        return min(cpu_total, res.cpus * res.workers + 1.0)

    def _run_stage(
        self, name: str, inputs: dict, upstream_fps: dict, last: dict | None, done: dict | None
    ) -> tuple[StageOutcome, str]:
        kind = self.dag.stage(name).uses
        t0 = time.time()
        cluster = self.cluster
        try:
            if self.executor == "ray" and getattr(get_kind(kind), "needs_ray", False):
                cluster = self.ray.ensure()  # a Ray Train job: Ray before it is planned
            plan, stage = plan_stage(
                self.dag,
                name,
                self.store,
                inputs,
                upstream_fps,
                last,
                done,
                count_work=False,
                verify_sources=self.verify_sources,
                tracking_uri=self.tracking_uri,
                cluster=cluster,
                progress=lambda c, total: self.console.samples(
                    name, c.processed + c.skipped + c.quarantined + c.filtered, total,
                    quarantined=c.quarantined, filtered=c.filtered),
                step_progress=lambda step, total, m: self.console.steps(name, step, total, m),
            )
        except Exception as e:  # planning touches inputs: report like a stage failure
            msg = f"{type(e).__name__}: {e}"
            self.console.print(redact_text(f"[{name}] FAILED while planning: {msg}"))
            return StageOutcome(name, kind, "failed", error=msg, seconds=time.time() - t0), ""
        fp = plan.fingerprint
        assert fp is not None  # plan_stage always computes it (only plan_dag leaves it unset)
        if plan.state == UP_TO_DATE:
            self.console.print(f"[{name}] up-to-date: skipped ({plan.reason})")
            return StageOutcome(
                name, kind, "skipped", plan.reason, outputs=plan.outputs, seconds=time.time() - t0
            ), fp
        self.console.print(f"[{name}] {plan.state}: {plan.reason}"
                           + (f" [sources: {plan.sources}]" if plan.sources else ""))
        stage.stage_fingerprint = fp
        child = self._stage_tracker(name, stage, fp, last)
        stage.ctx.tracker = child
        child.set_tags(
            {
                "vgen.stage": name,
                "vgen.kind": kind,
                "vgen.fingerprint": plan.fingerprint,
                "vgen.row_fingerprint": plan.row_fingerprint,
                **({"vgen.sources": plan.sources} if plan.sources else {}),
            }
        )
        # the config as written, redacted: a value a ${VAR} filled in shows as its template,
        # so an env-substituted secret never reaches MLflow (Dag.resolved)
        child.log_params(
            {"stage": {"name": name, "uses": kind, "config": self.dag.stage_config(name)}}
        )
        for u, outs in inputs.items():
            for k, ref in outs.items():
                if ref.kind == "table":
                    child.log_table_input(f"{u}.{k}", ref.uri, ref.version, None, None, "input")
        self.state.record(
            dag=self.dag.name,
            stage=name,
            kind=kind,
            fingerprint=fp,
            parts=plan.parts,
            status="started",
            # a stage that resumes its MLflow run (training) waits for the run id, so that a
            # resumed attempt finds it; others do not wait for the tracking process to create
            # it (the later records carry it)
            run_id=(child.run_id if getattr(stage, "resumes_tracking", False)
                    else _known_run_id(child)),
        )
        fault_point("after_stage_started")
        try:
            executor = None  # every stage kind gets the same executor (actor pools, map stages)
            if self.executor == "ray":
                from .ray_exec import RayDataExecutor

                executor = RayDataExecutor(connect=self.ray.ensure,
                                           in_process_rows=self.in_process_rows)
            result = stage.run(executor)
            if executor is not None and executor.ran.get(name) == "in-process":
                self.console.print(f"[{name}] ran in this process (to-do within the DAG's "
                                   f"in_process_rows={self.in_process_rows})")
        except Exception as e:
            msg = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
            log.debug("stage %s failed:\n%s", name, traceback.format_exc())
            self.console.done(name)
            self.console.print(redact_text(f"[{name}] FAILED: {msg}"))
            # the traceback: the log file when `vgen run` captures output, else stderr
            print(f"[{name}] FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            if self.log_path:
                self.console.print(f"[{name}] details: {self.log_path}")
            self.state.record(
                dag=self.dag.name,
                stage=name,
                kind=kind,
                fingerprint=fp,
                parts=plan.parts,
                status="failed",
                run_id=child.run_id,
                error=msg,
            )
            child.finish("FAILED")
            return StageOutcome(
                name, kind, "failed", plan.reason, error=msg, seconds=time.time() - t0
            ), fp
        seconds = time.time() - t0
        counts = result.counts
        child.log_metrics(
            {
                "processed": counts.processed,
                "skipped": counts.skipped,
                "quarantined": counts.quarantined,
                "filtered": counts.filtered,
                "seconds": seconds,
                **result.metrics,
            }
        )
        for k, ref in result.outputs.items():
            if ref.kind == "table":
                child.log_table_input(f"{name}.{k}", ref.uri, ref.version, None, None, "output")
        fault_point("before_stage_completed")
        self.state.record(
            dag=self.dag.name,
            stage=name,
            kind=kind,
            fingerprint=fp,
            parts=plan.parts,
            status="completed",
            run_id=child.run_id,
            outputs={k: v.to_json() for k, v in result.outputs.items()},
            counts=counts.to_json(),
        )
        fault_point("after_stage_completed")
        child.finish("FINISHED")
        self.console.done(name)
        if "final.step" in result.metrics:  # a training stage
            m = result.metrics
            what = f"trained {int(m['final.step'])} steps" + (
                f", final loss {m['final.loss']:.4g}" if "final.loss" in m else "")
        else:
            what = (f"processed={counts.processed} skipped={counts.skipped} "
                    f"quarantined={counts.quarantined}"
                    + (f" filtered={counts.filtered}" if counts.filtered else ""))
        self.console.print(f"[{name}] done in {seconds:.1f}s: {what}")
        return StageOutcome(
            name, kind, "ran", plan.reason, counts, result.outputs, result.metrics, seconds
        ), fp
