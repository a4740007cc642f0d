"""`TrackingSidecar`: the driver's MLflow runs, logged from a child process.

Why. Importing mlflow and opening its SQLAlchemy store costs the driver ~2.5 s of CPU before
the first record (measured: ``import mlflow`` 1.1 s, ``MlflowClient(sqlite).create_run`` with its
schema check 0.7-1.2 s, on this project's 2-core reference machine). On a re-run that has
little to do (a 1% change, a no-op) that is half of `vgen run`'s wall time, and under the GIL a
thread does not hide it (measured: importing mlflow in a thread beside torch made both slower).
A child process does: it imports mlflow and opens the run on the other core while the driver
imports torch, plans and computes. ``vgen run`` starts it first thing and waits for it at the
end, so when the command returns MLflow holds everything, as before.

How. `TrackingSidecar.spawn()` starts ``python -m vgen_core.tracking.sidecar`` (it imports
mlflow at once, before any request). `start(...)` returns a `SidecarTracker`, a `Tracker` whose
calls are pickled in the caller (a bad argument raises there: ``to_uint8_image``, metric values,
statuses are checked in the driver as `MlflowTracker` checks them) and queued to a sender thread,
so no call waits for MLflow: only ``run_id`` (until the run exists), ``reattach`` and the model
registry calls wait for their answer. In the child one `MlflowTracker` per handle does the work,
in order, with its own failure policy (a backend failure is a warning and a fallback record,
never an exception); warnings it logs are sent back and re-logged in the driver under the same
logger names (so ``vgen run`` prints them as before). Metric timestamps are taken in the driver.

Failure. Every request is acknowledged after it is applied. If the child dies (killed, out of
memory) the driver logs a warning and takes over in-process: it re-opens the runs the child had
created (`MlflowTracker.attach`, owner) and applies the requests the child had not acknowledged,
then every later call, itself: nothing is lost and nothing is applied twice except a request
the child applied but died before acknowledging. If the driver dies first, the child sees its
input close, applies what it had read, marks the runs it opened and did not finish KILLED and
exits. The child ignores SIGINT / SIGTERM (a Ctrl-C or ``vgen stop`` reaches the whole process
group): it finishes when the driver, which handles them, closes its input.

Output. The child's stdout and stderr go to a temporary file that the driver copies to its own
stderr when the child exits (`close`): under ``vgen run`` that is the run's log file.

``VGEN_TRACKING_SIDECAR=0`` makes ``vgen run`` log from the driver itself (`MlflowTracker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vgen_core.env import env_switch
from vgen_core.tracking.base import (
    FinishOnExit,
    check_status,
    flatten_params,
    metric_value,
    to_uint8_image,
)
from vgen_core.tracking.redact import redact_config

__all__ = ["SidecarTracker", "TrackingSidecar", "sidecar_enabled"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
#: calls the registry helpers of mlflow_tracker that a SidecarTracker forwards
_REMOTE_FUNCTIONS = frozenset({"register_model", "tag_model_versions"})
#: Tracker methods forwarded as they are
_CALLS = frozenset({"log_params", "log_metrics", "log_image", "log_text", "log_dict",
                    "log_table_input", "set_tags", "finish"})


def sidecar_enabled() -> bool:
    """False when ``VGEN_TRACKING_SIDECAR`` is 0/false/no/off (log from the driver)."""
    return env_switch("VGEN_TRACKING_SIDECAR")


def _write(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    """The next pickled message, or None at end of input."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    body = stream.read(n)
    if len(body) < n:
        return None
    return pickle.loads(body)


# --------------------------------------------------------------------------- the work (child)


class _Server:
    """Applies requests to `MlflowTracker`s by handle (in the child; in the driver after a
    takeover)."""

    def __init__(self) -> None:
        from vgen_core.tracking import mlflow_tracker

        self.mt = mlflow_tracker
        self.trackers: dict[int, Any] = {}
        self.tracking_uri: str | None = None

    def handle(self, op: str, h: int, args: Any) -> Any:
        if op == "start":
            self.tracking_uri = args["tracking_uri"]
            t = self.mt.MlflowTracker.start(**args)
        elif op == "child":
            parent, name = args
            t = self.trackers[parent].child(name)
        elif op == "reattach":
            parent, run_id = args
            t = self.trackers[parent].reattach(run_id)
            if t is None:
                return None
        elif op == "resume":  # a takeover: a run the child had opened (and maybe finished)
            t = self.mt.MlflowTracker.attach(args[0], args[1], owner=args[2],
                                             fallback_dir=args[3])
        elif op == "run_id":
            return self.trackers[h].run_id
        elif op == "call":
            method, a, kw = args
            if method not in _CALLS:
                raise ValueError(f"not a Tracker call: {method!r}")
            return getattr(self.trackers[h], method)(*a, **kw)
        elif op == "func":
            name, a, kw = args
            if name not in _REMOTE_FUNCTIONS:
                raise ValueError(f"not a forwarded tracking function: {name!r}")
            return getattr(self.mt, name)(self.trackers[h], *a, **kw)
        else:
            raise ValueError(f"unknown request {op!r}")
        self.trackers[h] = t
        return t.run_id

    def abandon(self, status: str = "KILLED") -> None:
        """End every run the driver did not finish with ``status`` (KILLED: the driver went
        away without closing; FAILED / KILLED: it closed on an error / an interrupt)."""
        for t in self.trackers.values():
            try:
                t.finish(status)  # a no-op for a finished or non-owner tracker
            except Exception:
                continue


class _Forward(logging.Handler):
    """Warnings of vgen's loggers in the child, sent to the driver to be logged there."""

    def __init__(self, send: Any) -> None:
        super().__init__(logging.WARNING)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(("log", record.name, record.levelno, record.getMessage()))
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> None:
    """The child: ``python -m vgen_core.tracking.sidecar REPLY_FD``; requests on stdin."""
    argv = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    replies = os.fdopen(int(argv[0]), "wb")
    lock = threading.Lock()
    gone = threading.Event()  # the driver closed its end: apply what was read, answer nothing

    def send(msg: Any) -> None:
        if gone.is_set():
            return
        data = pickle.dumps(msg)
        with lock:
            try:
                _write(replies, data)
            except (OSError, ValueError):
                gone.set()

    logging.getLogger("vgen_core").addHandler(_Forward(send))
    server = _Server()  # imports mlflow now, while the driver works
    requests = sys.stdin.buffer
    closed = False
    while True:
        msg = _read(requests)
        if msg is None:
            break
        seq, op, h, args = msg
        if op == "close":
            closed = True
            if args:  # the driver stopped on an error: its unfinished runs end with it
                server.abandon(args)
            send(("ack", seq, True, None))
            break
        try:
            result, ok = server.handle(op, h, args), True
        except Exception as e:  # a bug or a bad argument: the caller hears of it
            result, ok = f"{type(e).__name__}: {e}", False
            logger.warning("tracking request %s failed in the tracking process: %s", op, result)
        try:
            pickle.dumps(result)
        except Exception:
            result = None
        send(("ack", seq, ok, result))
    if not closed:
        server.abandon()
    with contextlib.suppress(OSError, ValueError):
        replies.close()
    # Every MLflow call above was synchronous (MlflowTracker logs with synchronous=True), so
    # nothing is left to flush but our own streams; MLflow's exit hooks (its telemetry client
    # waits on a config fetch from the network) cost ~1 s that the driver would wait for.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class _Broken:
    """Stands in for the server when neither the child nor this process can log (warned
    once): requests are dropped and answered with None, as a NullTracker would."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def handle(self, op: str, h: int, args: Any) -> Any:
        return None  # tracking never stops a run: run ids are None, records are dropped

    def abandon(self, status: str = "KILLED") -> None:
        return None


# --------------------------------------------------------------------------- the driver's side


class SidecarError(RuntimeError):
    """A request the tracking process refused (its message says why)."""


class TrackingSidecar:
    """The driver's handle on one tracking child process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._seq = 0
        self._handles = 0
        self._unacked: dict[int, tuple[str, int, Any]] = {}
        self._futures: dict[int, Future] = {}
        self._run_ids: dict[int, str] = {}
        self._finished: set[int] = set()  # handles whose finish the child applied
        self._local: _Server | _Broken | None = None  # once the child is gone: the driver logs
        self._closing = False
        self._started = False
        self._tracking_uri: str | None = None
        self._fallback_dir: str | None = None
        self._output: Any = tempfile.TemporaryFile()
        self._replies: BinaryIO | None = None
        self._proc: subprocess.Popen | None = None
        self._outbox: list[bytes] = []
        self._wake = threading.Condition(self._lock)

    @classmethod
    def spawn(cls) -> TrackingSidecar:
        """Start the child (it begins importing mlflow at once) and the threads that talk to it.
        If it cannot be started the tracker works in-process from the first request."""
        self = cls()
        r, w = os.pipe()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding vgen_core
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "vgen_core.tracking.sidecar", str(w)],
                stdin=subprocess.PIPE, stdout=self._output, stderr=self._output,
                pass_fds=(w,), env=env, close_fds=True)
        except OSError as e:
            os.close(r)
            os.close(w)
            logger.warning("could not start the tracking process (%s); logging to MLflow from "
                           "this process", e)
            self._local = _Server()
            return self
        os.close(w)
        self._replies = os.fdopen(r, "rb")
        threading.Thread(target=self._send_loop, name="vgen-tracking-send", daemon=True).start()
        threading.Thread(target=self._reply_loop, name="vgen-tracking-reply",
                         daemon=True).start()
        return self

    # ----------------------------------------------------------------- requests

    def start(self, tracking_uri: str, experiment: str, run_name: str,
              tags: Mapping[str, Any] | None = None, *, artifact_location: str | None = None,
              fallback_dir: str | Path | None = None) -> SidecarTracker:
        """Open the run (as `MlflowTracker.start`, in the child); returns at once."""
        self._started = True
        self._tracking_uri = tracking_uri
        self._fallback_dir = str(fallback_dir) if fallback_dir is not None else None
        h = self._new_handle()
        self.request("start", h, {
            "tracking_uri": tracking_uri, "experiment": experiment, "run_name": run_name,
            "tags": dict(tags or {}), "artifact_location": artifact_location,
            "fallback_dir": str(fallback_dir) if fallback_dir is not None else None})
        return SidecarTracker(self, h, tracking_uri)

    def _new_handle(self) -> int:
        with self._lock:
            self._handles += 1
            return self._handles

    def request(self, op: str, h: int, args: Any, *, wait: bool = False) -> Any:
        """Queue one request; with ``wait``, block for its result (SidecarError if refused)."""
        data = None
        with self._lock:
            if self._closing and self._local is None:
                raise RuntimeError(f"tracking request {op!r} after the tracking process was "
                                   "closed")
            if self._local is None:
                seq = self._seq
                self._seq += 1
                data = pickle.dumps((seq, op, h, args))  # unpicklable: raises here, the caller
                self._unacked[seq] = (op, h, args)
                fut: Future | None = Future() if wait else None
                if fut is not None:
                    self._futures[seq] = fut
                self._outbox.append(_HEADER.pack(len(data)) + data)
                self._wake.notify()
            else:
                result = self._local.handle(op, h, args)
                self._note_run_id(op, h, result)
                return result
        if fut is None:
            return None
        return fut.result()

    def _note_run_id(self, op: str, h: int, result: Any) -> None:
        """Remember the run id a request that opens a run answered (under the lock)."""
        if op in ("start", "child", "reattach", "resume") and result:
            self._run_ids[h] = result

    def run_id(self, h: int) -> str | None:
        with self._lock:
            known = self._run_ids.get(h)
        return known if known is not None else self.request("run_id", h, None, wait=True)

    # ----------------------------------------------------------------- threads

    def _send_loop(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        while True:
            with self._lock:
                while not self._outbox:
                    self._wake.wait()
                batch, self._outbox = self._outbox, []
            try:
                stdin.write(b"".join(batch))
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return  # the child is gone: the reply loop takes over
            with self._lock:
                done = self._closing and not self._outbox
            if done:  # the close request is written: nothing follows it
                with contextlib.suppress(OSError):
                    stdin.close()
                return

    def _reply_loop(self) -> None:
        assert self._replies is not None
        while True:
            try:
                msg = _read(self._replies)
            except Exception:
                msg = None
            if msg is None:
                break
            if msg[0] == "log":
                _, name, level, text = msg
                logging.getLogger(name).log(level, "%s", text)
                continue
            _, seq, ok, result = msg
            with self._lock:
                op, h, args = self._unacked.pop(seq, ("?", 0, None))
                if ok:
                    self._note_run_id(op, h, result)
                    if op == "call" and args[0] == "finish":
                        self._finished.add(h)
                fut = self._futures.pop(seq, None)
            if fut is not None:
                if ok:
                    fut.set_result(result)
                else:
                    fut.set_exception(SidecarError(result))
        self._takeover()

    def _takeover(self) -> None:
        """The child exited (or its answers broke off): apply what it had not acknowledged
        here, and every later call. If that fails too, every waiting and later request gets a
        None answer and the run goes on untracked (nothing hangs)."""
        with self._lock:
            if self._closing and not self._unacked:
                return
            try:
                self._take_over_locked()
            except BaseException as e:
                logger.warning("logging to MLflow from this process failed too (%s: %s); "
                               "this run is not tracked from here on", type(e).__name__, e)
                self._local = _Broken(f"{type(e).__name__}: {e}")
                for seq in list(self._unacked):
                    self._unacked.pop(seq)
                    fut = self._futures.pop(seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    def _take_over_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # answers broke off but it runs: it must not apply them too
        code = self._proc.wait() if self._proc is not None else None
        logger.warning(
            "the tracking process exited (code %s) with %d request(s) not applied; this "
            "process logs to MLflow from here on (its output: in this run's log)",
            code, len(self._unacked))
        self._relay_output()  # before any waiter (close) resumes
        local = _Server()
        for h, run_id in self._run_ids.items():
            try:  # a run the child finished is reopened without owning it (no status change)
                local.handle("resume", h, (self._tracking_uri, run_id,
                                           h not in self._finished, self._fallback_dir))
            except Exception as e:
                logger.warning("could not reopen MLflow run %s: %s", run_id, e)
        for seq in sorted(self._unacked):
            op, h, args = self._unacked.pop(seq)
            fut = self._futures.pop(seq, None)
            try:
                if op == "close":
                    result = None
                    if args:
                        local.abandon(args)
                else:
                    result = local.handle(op, h, args)
            except Exception as e:
                if fut is not None:
                    fut.set_exception(SidecarError(f"{type(e).__name__}: {e}"))
                continue
            self._note_run_id(op, h, result)
            if fut is not None:
                fut.set_result(result)
        self._local = local

    # ----------------------------------------------------------------- the end

    def close(self, timeout: float | None = None, *, unfinished: str | None = None) -> None:
        """Wait until the child has applied every request and exited, then copy its output to
        this process's stderr. ``unfinished`` (FAILED, KILLED): the status of runs the driver
        did not finish (it stops on an error). A child that was never given a run is stopped at
        once. Requests after this raise RuntimeError."""
        if unfinished is not None:
            check_status(unfinished, "unfinished")
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._local is not None or self._proc is None:
                if self._local is not None and unfinished:
                    self._local.abandon(unfinished)
                return
            if not self._started:  # nothing to log (an invalid DAG): do not wait for mlflow
                self._proc.kill()
                self._proc.wait()
                self._relay_output()
                return
            seq = self._seq
            self._seq += 1
            fut: Future = Future()
            self._futures[seq] = fut
            self._unacked[seq] = ("close", 0, unfinished)
            data = pickle.dumps((seq, "close", 0, unfinished))
            self._outbox.append(_HEADER.pack(len(data)) + data)
            self._wake.notify()
        try:
            fut.result(timeout=timeout)
            self._proc.wait(timeout=timeout)
        except Exception:
            return  # the child goes on on its own (its input is closed when this process ends)
        self._relay_output()

    def _relay_output(self) -> None:
        """The child's stdout/stderr, copied to this process's stderr (fd 2) once."""
        with self._lock:
            out, self._output = self._output, None
        if out is None:
            return
        try:
            out.seek(0)
            data = out.read()
            if data:
                sys.stderr.flush()
                os.write(2, data)
        except Exception:
            pass
        finally:
            out.close()


class SidecarTracker(FinishOnExit):
    """A `Tracker` whose MLflow run lives in the tracking process (see the module docstring).
    Calls return at once; ``run_id`` waits until the run exists."""

    def __init__(self, sidecar: TrackingSidecar, handle: int, tracking_uri: str) -> None:
        self._sidecar = sidecar
        self._h = handle
        self._tracking_uri = tracking_uri
        self._finished = False

    @property
    def run_id(self) -> str | None:
        return self._sidecar.run_id(self._h)

    @property
    def known_run_id(self) -> str | None:
        """The run id if the tracking process has reported it already, else None (no wait)."""
        with self._sidecar._lock:
            return self._sidecar._run_ids.get(self._h)

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    def _call(self, method: str, *a: Any, **kw: Any) -> None:
        self._sidecar.request("call", self._h, (method, a, kw))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", flatten_params(redact_config(dict(params))))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {str(k): metric_value(k, v) for k, v in metrics.items()}
        self._call("log_metrics", values, step, timestamp_ms=int(time.time() * 1000))

    def log_image(self, name: str, image: np.ndarray, step: int | None = None) -> None:
        self._call("log_image", name, to_uint8_image(image), step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", str(text), artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self._call("log_dict", dict(d), artifact_file)

    def log_table_input(self, name: str, uri: str, version: int, num_rows: int | None = None,
                        digest: str | None = None, context: str = "input") -> None:
        self._call("log_table_input", name, uri, int(version), num_rows, digest, context)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", {str(k): str(v) for k, v in tags.items()})

    def child(self, name: str) -> SidecarTracker:
        h = self._sidecar._new_handle()
        self._sidecar.request("child", h, (self._h, name))
        return SidecarTracker(self._sidecar, h, self._tracking_uri)

    def reattach(self, run_id: str) -> SidecarTracker | None:
        """An earlier run of this tracking store reopened (owner), or None if it cannot be
        (as `MlflowTracker.reattach`); waits for the answer."""
        h = self._sidecar._new_handle()
        got = self._sidecar.request("reattach", h, (self._h, run_id), wait=True)
        return SidecarTracker(self._sidecar, h, self._tracking_uri) if got else None

    def remote_call(self, name: str, *a: Any, **kw: Any) -> Any:
        """``mlflow_tracker.<name>(this run's tracker, ...)`` in the tracking process (the model
        registry helpers); waits for the result."""
        return self._sidecar.request("func", self._h, (name, a, kw), wait=True)

    def finish(self, status: str = "FINISHED") -> None:
        check_status(status)
        if self._finished:
            return
        self._finished = True
        self._call("finish", status)

    def __repr__(self) -> str:
        return f"SidecarTracker(handle={self._h})"


if __name__ == "__main__":
    main()
