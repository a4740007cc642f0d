"""`vgen ui` serves the MLflow UI of a storage root on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import ROOT, vgen_cmd

pytestmark = pytest.mark.slow


def test_ui_serves_mlflow_on_loopback(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(vgen_cmd() + ["ui", "--storage", str(tmp_path), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        body, deadline = None, time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode(errors="replace")
                    break
            except OSError:
                time.sleep(1)
        assert body is not None, proc.stdout.read().decode(errors="replace") if proc.poll() else ""
        assert "mlflow" in body.lower()
        assert (tmp_path / "mlflow.db").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
