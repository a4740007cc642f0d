"""The console of `vgen run` (pipelines.console): progress lines, the live block, the capture of
library output into the run's log file."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from pipelines import console as console_mod
from pipelines.console import Console, format_duration, run_log_path, vgen_warnings_to
from tests.conftest import ROOT


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(console_mod.time, "monotonic", c)
    return c


def test_format_duration():
    assert [format_duration(s) for s in (0, 9.6, 59, 60, 185, 3599, 3600, 7260)] == [
        "0s", "10s", "59s", "1m00s", "3m05s", "59m59s", "1h00m", "2h01m"]


def test_plain_mode_prints_each_stage_at_most_once_per_interval(clock):
    out = io.StringIO()
    c = Console(out, live=False, interval=30)
    c.samples("tokens", 0, 96)  # t=0: the stage starts
    clock.t += 10
    c.samples("tokens", 20, 96)  # shorter than the interval so far: nothing
    assert out.getvalue() == ""
    clock.t += 20
    c.samples("tokens", 60, 96, quarantined=2)  # 30 s in: one line, with rate and ETA
    assert out.getvalue() == "[tokens] 60/96 samples (62%)  2.0/s  ETA 18s  quarantined 2\n"
    clock.t += 5
    c.samples("tokens", 70, 96)  # 5 s after the last line: nothing
    clock.t += 30
    c.samples("tokens", 70, 96)  # 35 s after the last line, and it moved
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == "[tokens] 70/96 samples (72%)  1.1/s  ETA 24s"
    clock.t += 40
    c.samples("tokens", 70, 96)  # no move since the last printed line: nothing
    assert len(out.getvalue().splitlines()) == 2
    c.print("[tokens] done")
    assert out.getvalue().splitlines()[-1] == "[tokens] done"


def test_a_short_stage_prints_no_progress_and_late_updates_are_dropped(clock):
    out = io.StringIO()
    c = Console(out, live=False, interval=30)
    c.samples("images", 10, 80)
    clock.t += 3
    c.samples("images", 80, 80)
    c.done("images")
    clock.t += 100
    c.samples("images", 80, 80)  # after done(): a new line object; starts its own interval
    assert out.getvalue() == ""


def test_training_line(clock):
    out = io.StringIO()
    c = Console(out, live=False, interval=0)
    c.steps("generator", 0, 200, {})
    clock.t += 1
    c.steps("generator", 120, 200, {"loss": 3.21449, "samples_per_second": 41.25,
                                    "steps_per_second": 4.0, "lr": 1e-3})
    assert out.getvalue().splitlines()[-1] == (
        "[generator] step 120/200  loss 3.214  41.2 samples/s  ETA 20s")


def test_live_mode_redraws_one_block_in_place(clock):
    out = io.StringIO()
    c = Console(out, live=True)
    c.samples("a", 0, 10)
    clock.t += 1
    c.samples("b", 0, 4)
    assert out.getvalue() == "[a] 0/10 samples (0%)\n\x1b[1F\x1b[J[a] 0/10 samples (0%)\n" \
        "[b] 0/4 samples (0%)\n"
    clock.t += 0.1  # within REDRAW_S of the last draw: no redraw
    c.samples("a", 5, 10)
    assert out.getvalue().count("\x1b[") == 2
    out.truncate(0), out.seek(0)
    c.print("[a] something happened")  # a permanent line goes above the block
    assert out.getvalue() == ("\x1b[2F\x1b[J[a] something happened\n"
                              "[a] 5/10 samples (50%)  4.5/s  ETA 1s\n[b] 0/4 samples (0%)\n")
    out.truncate(0), out.seek(0)
    c.done("a")
    c.close()
    assert out.getvalue() == "\x1b[2F\x1b[J[b] 0/4 samples (0%)\n\x1b[1F\x1b[J"


def test_vgen_warnings_become_one_console_line_others_do_not():
    out = io.StringIO()
    c = Console(out, live=False)
    with vgen_warnings_to(c):
        logging.getLogger("vgen.eval").warning("FID on %d samples is not meaningful:\nmore", 16)
        logging.getLogger("vgen.eval").info("not shown")
        logging.getLogger("ray.data").warning("library chatter")
    logging.getLogger("vgen.eval").warning("after: not shown")
    assert out.getvalue() == "warning: FID on 16 samples is not meaningful:\n"


def test_run_log_path(tmp_path):
    local, uri = run_log_path(str(tmp_path), "demo")
    assert uri is None and local.startswith(f"{tmp_path}/_vgen/logs/demo/")
    assert local.endswith(f"-{os.getpid()}.log")
    local, uri = run_log_path("s3://bucket/root", "demo")
    assert uri.startswith("s3://bucket/root/_vgen/logs/demo/") and not local.startswith("s3:")


SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pipelines.console import capture_output
    with capture_output(sys.argv[1], verbose=sys.argv[2] == "1") as (err, out):
        print("python stdout"); print("python stderr", file=sys.stderr)
        os.write(1, b"fd1\\n"); os.write(2, b"fd2\\n")
        subprocess.run([sys.executable, "-c", "print('child')"])
        err.write("vgen line\\n"); out.write("summary\\n")
    print("after")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_capture_output_sends_library_output_to_the_log_file(tmp_path, verbose):
    log = tmp_path / "logs" / "run.log"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    library = ["python stdout", "python stderr", "fd1", "fd2", "child"]
    assert sorted(log.read_text().splitlines()) == sorted(library)
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert p.stdout.splitlines() == ["summary", "after"]
    err = p.stderr.splitlines()
    if verbose:  # streamed too, in order per descriptor
        assert sorted(err) == sorted(library + ["vgen line"])
    else:
        assert err == ["vgen line"]


def test_a_failed_stage_shows_its_error_and_the_log_file(tmp_path):
    """`vgen run` whose stage fails (over its error budget): the console has the error and the
    log file's path; exit 1."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"name: failing\nerror_budget: 0.0\nstages:\n"
                   f"  images: {{uses: ingest.images, with: {{root: '{images}', size: 16}}}}\n")
    storage = tmp_path / "store"
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(dag), "--storage",
                        str(storage), "--local"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, VGEN_PROGRESS_INTERVAL="0"))
    assert p.returncode == 1, p.stdout + p.stderr
    console = (p.stdout + p.stderr).splitlines()
    (failed,) = [line for line in console if line.startswith("[images] FAILED: ")]
    assert "error_budget" in failed and "broken.png" in failed
    (log,) = [line.split(None, 1)[1] for line in console if line.startswith("Log: ")]
    assert f"[images] details: {log}" in console
    assert "Traceback" not in p.stderr and len(console) < 30
    assert "[images] FAILED:" in open(log).read()


def test_rate_counts_only_work_done_since_the_first_update(clock):
    """9000 items skipped (unchanged) before the first update are not a rate of 9000/s."""
    out = io.StringIO()
    c = Console(out, live=False, interval=0)
    c.samples("tokens", 9000, 9100)
    clock.t += 2
    c.samples("tokens", 9020, 9100)
    assert out.getvalue().splitlines()[-1] == "[tokens] 9020/9100 samples (99%)  10.0/s  ETA 8s"


def test_live_update_after_done_does_not_bring_the_line_back(clock):
    out = io.StringIO()
    c = Console(out, live=True)
    c.samples("a", 1, 2)
    c.done("a")
    clock.t += 1
    c.samples("a", 2, 2)  # a late callback from a worker thread
    c.close()
    assert out.getvalue() == "[a] 1/2 samples (50%)\n\x1b[1F\x1b[J"
