"""What ``vgen run`` shows a person, and where everything else goes.

The console carries vgen's own lines only: one line when a stage starts (its plan), one live
progress line per running stage, one line when it ends, warnings that mean something to the user
(records of the ``vgen`` loggers at WARNING and above), and the final table. Everything the
libraries print (Ray's start-up and worker logs, Ray Data's and Ray Train's reports, DeepSpeed,
MLflow, Python warnings, tracebacks) goes to the run's log file, :func:`capture_output`, whose
path is printed at the start and at the end; ``vgen run --verbose`` streams it to the console too.

Progress lines:

- per-sample stages: ``[tokens] 40/96 samples (42%)  5.1/s  ETA 11s  quarantined 2``
- training: ``[generator] step 120/200  loss 3.214  41.3 samples/s  ETA 19s``

On a terminal the progress lines are one block under the other output, redrawn in place (at most
``REDRAW_S`` apart); otherwise (CI logs, ``ray job submit``, a pipe) each stage prints a plain line
at most every ``VGEN_PROGRESS_INTERVAL`` seconds (default 30) and only when it moved, so a log stays
short. ``NO_COLOR`` / ``TERM=dumb`` force the plain mode.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["Console", "capture_output", "format_duration", "run_log_path"]

#: seconds between redraws of the live block on a terminal
REDRAW_S = 0.25
#: seconds between plain progress lines of one stage when not on a terminal
DEFAULT_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h01m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


@dataclass
class _Line:
    stage: str
    started: float = field(default_factory=lambda: time.monotonic())
    text: str = ""
    printed_at: float = 0.0  # plain mode: when this stage's last line went out
    printed_key: Any = None  # what the last printed line said: it is only repeated on a move
    done0: int | None = None  # done at the first update (items skipped before any work)


class Console:
    """vgen's console. Thread-safe: stages run concurrently (``pipelines.dag.runner``)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 interval: float | None = None):
        self.stream = stream or sys.stderr
        if live is None:
            live = (_isatty(self.stream) and os.environ.get("TERM", "") != "dumb"
                    and "NO_COLOR" not in os.environ)
        self.live = live
        if interval is None:
            interval = float(os.environ.get("VGEN_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.interval = interval
        self._lines: dict[str, _Line] = {}
        self._finished: set[str] = set()
        self._drawn = 0  # live block lines on screen now
        self._last_draw = 0.0
        self._lock = threading.RLock()

    # -- permanent lines --------------------------------------------------------------------
    def print(self, text: str = "") -> None:
        """A line that stays (above the live block on a terminal)."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._draw()
            self.stream.flush()

    # -- progress -----------------------------------------------------------------------------
    def samples(self, stage: str, done: int, total: int, *, quarantined: int = 0,
                filtered: int = 0, unit: str = "samples") -> None:
        """Progress of a per-sample stage: ``done`` of ``total`` items handled."""
        line = self._line(stage)
        if line is None:
            return
        if line.done0 is None:
            line.done0 = done  # what was skipped before the first update is not work done
        elapsed = time.monotonic() - line.started
        text = f"[{stage}] {done}/{total} {unit}"
        if total:
            text += f" ({100 * done // total}%)"
        if elapsed > 0 and done > line.done0:
            rate = (done - line.done0) / elapsed
            text += f"  {_rate(rate)}/s"
            if total > done:
                text += f"  ETA {format_duration((total - done) / rate)}"
        if quarantined:
            text += f"  quarantined {quarantined}"
        if filtered:
            text += f"  filtered {filtered}"
        self._update(line, text, (done, total))

    def steps(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        """Progress of a training stage: optimizer ``step`` of ``total``, the last logged
        ``metrics`` (``loss``, ``samples_per_second``, ``steps_per_second``)."""
        line = self._line(stage)
        if line is None:
            return
        text = f"[{stage}] step {step}/{total}"
        if "loss" in metrics:
            text += f"  loss {metrics['loss']:.4g}"
        if metrics.get("samples_per_second"):
            text += f"  {_rate(metrics['samples_per_second'])} samples/s"
        sps = metrics.get("steps_per_second")
        if sps and total > step:
            text += f"  ETA {format_duration((total - step) / sps)}"
        self._update(line, text, (step, total))

    def done(self, stage: str) -> None:
        """The stage ended: its progress line goes (its own final line follows via print)."""
        with self._lock:
            self._finished.add(stage)
            if self._lines.pop(stage, None) is not None and self.live:
                self._clear()
                self._draw()
                self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._lines.clear()
            self.stream.flush()

    # -- internals ----------------------------------------------------------------------------
    def _line(self, stage: str) -> _Line | None:
        """The stage's progress line (None once the stage is done: a late update is dropped)."""
        with self._lock:
            if stage in self._finished:
                return None
            return self._lines.setdefault(stage, _Line(stage))

    def _update(self, line: _Line, text: str, key: Any) -> None:
        with self._lock:
            if self._lines.get(line.stage) is not line:
                return  # a late update after done()
            line.text = text
            now = time.monotonic()
            if self.live:
                if now - self._last_draw >= REDRAW_S:
                    self._clear()
                    self._draw()
                    self.stream.flush()
                return
            if key == line.printed_key or now - line.printed_at < self.interval:
                return
            if not line.printed_at and now - line.started < self.interval:
                return  # a stage shorter than the interval prints no progress at all
            line.printed_at, line.printed_key = now, key
            self.stream.write(text + "\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._drawn:
            # up to the first line of the block, and clear from there to the end of the screen
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live or not self._lines:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        for line in self._lines.values():
            self.stream.write(line.text[:width] + "\n")
        self._drawn = len(self._lines)
        self._last_draw = time.monotonic()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _ConsoleHandler(logging.Handler):
    """Records of the ``vgen`` loggers at WARNING and above, as one console line each."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().strip().splitlines()
            first = msg[0] if msg else ""
            self.console.print(f"{record.levelname.lower()}: {first}")
        except Exception:  # a console line is never worth a crash
            self.handleError(record)


def run_log_path(storage_root: str, dag: str) -> tuple[str, str | None]:
    """Where this run's log goes: ``(local file, storage URI or None)``.

    ``<storage>/_vgen/logs/<dag>/<UTC time>-<pid>.log`` for a local storage root; for an object
    store, a file in a new private (0700) folder under the temp dir, copied to that URI when the
    run ends."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rel = f"_vgen/logs/{dag}/{stamp}-{os.getpid()}.log"
    if "://" not in storage_root or storage_root.startswith("file://"):
        root = storage_root.removeprefix("file://")
        return os.path.join(root, rel), None
    import tempfile

    local = os.path.join(tempfile.mkdtemp(prefix="vgen-log-"), os.path.basename(rel))
    return local, f"{storage_root.rstrip('/')}/{rel}"


@contextlib.contextmanager
def capture_output(path: str, *, verbose: bool = False) -> Iterator[tuple[TextIO, TextIO]]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: Python, C extensions and
    child processes alike) to the log file ``path`` (mode 0600, appended), and yield
    ``(console_err, console_out)``: streams on the original stderr / stdout for vgen's own lines.
    With ``verbose`` everything written to 1 and 2 is also copied to the original stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    tee: threading.Thread | None = None
    if verbose:
        r, w = os.pipe()
        # the thread's own copies, closed by the thread: a child process that still holds the
        # pipe's write end after the run keeps the thread alive, never a reused fd number
        log_fd, con_fd = os.dup(fd), os.dup(saved_err)

        def pump() -> None:  # the pipe -> the log file and the console
            try:
                while True:
                    try:
                        chunk = os.read(r, 1 << 16)
                    except OSError:
                        break
                    if not chunk:
                        break
                    for target in (log_fd, con_fd):  # a full disk must not stop the draining
                        with contextlib.suppress(OSError):
                            os.write(target, chunk)
            finally:
                for x in (r, log_fd, con_fd):
                    with contextlib.suppress(OSError):
                        os.close(x)

        tee = threading.Thread(target=pump, name="vgen-log-tee", daemon=True)
        tee.start()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
    else:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        yield err, out
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved_out, 1)  # closes the last write end of the pipe: the tee sees EOF
        os.dup2(saved_err, 2)
        if tee is not None:  # EOF once no child holds the pipe; else it drains on its own fds
            tee.join(timeout=2)
        os.close(saved_out)
        os.close(saved_err)
        os.close(fd)
        err.flush()
        out.flush()


@contextlib.contextmanager
def vgen_warnings_to(console: Console) -> Iterator[None]:
    """While inside: WARNING records of the ``vgen`` loggers also become console lines."""
    logger = logging.getLogger("vgen")
    handler = _ConsoleHandler(console)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
