"""Reading the stage records (`_vgen/stage_runs`) as they grow, and after compaction.

    .venv/bin/python benchmarks/stage_records.py [--points 100,400,1000]

Every plan reads the records table (`StageState.latest`); each record is one Delta commit and
one small Parquet file, so the read grows with a DAG's history. This appends records (three
stages in turn, as runs do) up to each point and times `latest` (best of 3), then compacts the
table as `Runner.run` does (`StageState.compact`, from 64 files) and times it again. Printed: the
time per point and, at the last point, compacted / uncompacted (the ratio, same run).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pipelines.dag.state import StageState
from vgen_core.data import TableStore


def best_latest(state: StageState, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        state.latest("d")
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="100,400,1000", help="record counts to time at")
    args = ap.parse_args()
    points = [int(p) for p in args.points.split(",")]
    with tempfile.TemporaryDirectory() as root:
        state = StageState(TableStore(root))
        n = 0
        for target in points:
            while n < target:
                state.record(dag="d", stage=f"s{n % 3}", kind="k", fingerprint="f" * 16,
                             parts={"n": n}, status="completed", run_id="r" * 32,
                             outputs={"o": {"kind": "table", "uri": "/x", "version": n}})
                n += 1
            print(f"{n:>6} records (one file each): latest {best_latest(state):.3f} s",
                  flush=True)
        before = best_latest(state)
        state.compact()
        after = best_latest(state)
        print(f"{n:>6} records, compacted to one file: latest {after:.3f} s; compacted / "
              f"uncompacted = {after / before:.3f}")


if __name__ == "__main__":
    main()
