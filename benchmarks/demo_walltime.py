"""Wall time of the demo DAG: a first run on an empty storage root, then a no-op re-run.

    .venv/bin/python benchmarks/demo_walltime.py [--storage DIR]

Prints both times and the ratio no-op / first run (the baseline is the first run, measured in the
same invocation). Uses the CLI exactly as a user would (`vgen run`, embedded local Ray).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"


def timed_run(storage: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(DEMO), "--storage", storage],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default=None, help="storage root (default: a fresh temp dir)")
    args = ap.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="vgen-bench-")
    shutil.rmtree(storage, ignore_errors=True)
    first = timed_run(storage)
    noop = timed_run(storage)
    print(f"demo first run : {first:7.1f} s")
    print(f"demo no-op run : {noop:7.1f} s")
    print(f"ratio no-op/first: {noop / first:.3f}")


if __name__ == "__main__":
    main()
