"""The embedded Ray that `vgen run` starts without an address (`connect_ray()`) listens on
loopback only: no process of it (GCS, raylet and its object manager, workers, agents, the
driver's own gRPC server) accepts connections on 0.0.0.0, :: or the machine's routable IP.

This needs its own Ray: the session cluster of tests/conftest.py is started by `ray start`, not
by `connect_ray()`, and a `ray.init` in the pytest process would stay connected for the rest of
the session. So a child process calls `connect_ray()`, runs a task, and reports the listening
sockets of its process tree; its process group is killed afterwards (only what it started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil

from tests.conftest import ROOT

LOOPBACK = ("127.", "::1", "::ffff:127.")

_CHILD = r"""
import json, time
import psutil, ray
from pipelines.dag.runner import connect_ray

connect_ray()

@ray.remote
def where():
    return ray.util.get_node_ip_address()

ip = ray.get(where.remote())
time.sleep(2)  # agents bind their ports while the first task runs
me = psutil.Process()
procs = {p.pid: p for p in me.children(recursive=True)}
procs[me.pid] = me
sockets = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in procs:
        try:
            name = procs[c.pid].name()
        except psutil.Error:
            name = "?"
        sockets.append({"name": name, "pid": c.pid, "ip": c.laddr.ip, "port": c.laddr.port})
node = ray._private.worker.global_worker.node
print("RESULT " + json.dumps({"task_ip": ip, "node_ip": node.node_ip_address,
                              "gcs": node.gcs_address, "sockets": sockets}), flush=True)
ray.shutdown()
"""


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # no token to generate into the real ~/.ray (auth is not what this test checks)
    env.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        try:  # whatever the child's Ray left behind, and only that
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])

    assert res["node_ip"] == "127.0.0.1" and res["task_ip"] == "127.0.0.1"
    assert res["gcs"].startswith("127.0.0.1:")
    names = {s["name"] for s in res["sockets"]}
    assert {"gcs_server", "raylet"} <= names, res["sockets"]  # the check is not vacuous
    exposed = [s for s in res["sockets"] if not s["ip"].startswith(LOOPBACK)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    alive = [s for s in res["sockets"] if _running(s["pid"])]
    assert not alive, f"left running: {alive}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

