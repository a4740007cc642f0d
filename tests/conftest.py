"""Shared fixtures: one local Ray cluster per test session (started with ``ray start --head``
on 127.0.0.1, used by every e2e run through RAY_ADDRESS), and GPU/slow markers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# The session's test cluster lives on 127.0.0.1 only; token auth (Ray's default for new clusters)
# would need the token handed to every `vgen` subprocess.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Tests run on tiny data, all of it under a DAG's in_process_rows: without this every e2e stage
# would run in its `vgen` driver and the Ray paths (actor pools, worker-written files, worker
# kills) would go untested. tests/unit/test_lazy_ray.py unsets it to test the in-process route.
os.environ.setdefault("VGEN_IN_PROCESS_ROWS", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models train faster and more reproducibly on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a 2-CPU Ray head on 127.0.0.1, shared by the whole session.

    Started with ``ray start --head --block`` in its own process group and stopped by signalling
    that group, so other Ray instances on the machine are left alone."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        probe = subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True,
                               timeout=120)
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray start failed: {(temp / 'ray-start.log').read_text()[-3000:]}")
        time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def vgen_cmd() -> list[str]:
    return [sys.executable, "-m", "pipelines.cli"]


def run_output(p: subprocess.CompletedProcess) -> str:
    """What a `vgen run` subprocess said: its stderr and stdout, then its run log file (library
    output, tracebacks, fault-point messages: ``pipelines.console``), whose path it prints."""
    import re

    text = (p.stderr or "") + (p.stdout or "")
    m = re.search(r"^vgen: log file (\S+)", p.stderr or "", re.M)
    if m and os.path.exists(m.group(1)):
        text += "\n==== " + m.group(1) + "\n" + Path(m.group(1)).read_text(errors="replace")
    return text


@contextlib.contextmanager
def serve_ui(storage: Path, timeout: float = 120.0):
    """`vgen ui --storage STORAGE` on a free loopback port: yields its base URL once it answers,
    and stops it (SIGTERM, which `vgen ui` passes on to the server's process group) after."""
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(vgen_cmd() + ["ui", "--storage", str(storage), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.poll() else ""
                    raise RuntimeError(
                        f"vgen ui did not come up on {url}: {out[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
