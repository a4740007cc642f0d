"""Cost growth at scale, on the CPU, by simulation: wall time and peak memory of `vgen plan`, a
no-op `vgen run` and a 1% change, against curated and side tables of 10^4..10^6 rows and source
folders of 10^3..10^5 files.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/scaling.py \\
        [--rows 1e4,1e5,1e6] [--files 1e3,1e4,1e5] [--full 1e4] [--chunk-size 4096]

The DAG is the incremental benchmark's: ``ingest.images`` (a folder of small PNGs in 100 class
sub-folders, ``crops_per_image`` 32 px crops each) -> ``tokenize.fsq`` tiny (+flip). Two series:

* **rows**: ``--rows`` N rows in the curated table and the side table, from N / ``--crops``
  files (64 crops a file by default, so 10^6 rows are 15,625 files);
* **files**: ``--files`` F files, one crop each (F rows): the listing / stat cost of the source
  stage.

**Synthetic, but the state a real run leaves.** Running the stages on 10^6 rows takes hours on 2
cores, so the tables are written directly, with the code paths the stages use for their names,
fingerprints and records: ``plan_stage`` gives each stage's fingerprint, parts and row
fingerprint (so the listing of the real folder, the tokenizer's weights digest and the upstream
table version all enter exactly as in a run); ``ingest.images``' own ``list_items`` gives the
sample ids, item keys and stamps; the tokenizer is exported by the stage itself and one real
sample is tokenized by it for the side-table payload (every row carries that payload: tiny, and
the same size as a real row). Tables are written through ``TableStore`` with the stages' schemas,
commit metadata and chunking (one commit per ``--chunk-size`` rows, the DAG's ``chunk_size``:
the Delta logs have the commits a real run makes, checkpoints included), ``<stage>__sources``
records every item with its stamp, and ``_vgen/stage_runs`` gets the started + completed
records. The benchmark checks the result: `vgen plan` must find every stage up-to-date and the
untimed warm-up `vgen run` must skip both. With ``--full`` a real full run on an empty root over
the same folder must reproduce the seeded fingerprints, and `vgen plan` / no-op are timed on that
real root too, so the simulated figures can be compared with real ones.

Timed, each a fresh process (the CLI as a user runs it, `python -m pipelines.cli`), wall time and
the peak RSS of that process (``os.wait4``; Ray's own processes, started by the 1% run, are not in
it): ``plan`` and ``no-op`` (best of ``--repeat``), then ``--changed`` of the files changed (half
rewritten with new pixels, half added) and ``1% plan`` / ``1% run`` (one each; the run starts an
embedded Ray as `vgen run` does). Each 1% run must process exactly the changed rows in both stages.
``--full``: real full runs (empty root, embedded Ray) at those row counts of the rows series,
for the full-run cost per row.

Printed: one table per series, growth exponents between consecutive sizes (d log t / d log N: 1 is
linear), and the issue's goals: plan and no-op at most linear and under 60 s / 2 GiB at 10^6 rows;
1% change <= 0.05 x full run + no-op, where a full run not measured at that size is extrapolated
from the measured ones (said so on the line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 100
GOAL_SECONDS, GOAL_MIB = 60.0, 2048.0


# -- the source folder and the DAG -------------------------------------------------------------
def _png(rng: np.random.Generator, side: int = 24) -> bytes:
    from vgen_core.data.sample_images import encode_png

    return encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def write_folder(folder: Path, n_files: int, seed: int = 0) -> list[Path]:
    """``n_files`` small PNGs (the same bytes: the listing and stat cost is what matters) in
    ``CLASSES`` class folders (the ImageFolder layout)."""
    data = _png(np.random.default_rng(seed))
    paths = []
    for i in range(n_files):
        cls = folder / f"class{i % CLASSES:03d}"
        if i < CLASSES:
            cls.mkdir(parents=True, exist_ok=True)
        p = cls / f"img{i:07d}.png"
        p.write_bytes(data)
        paths.append(p)
    return paths


def change_files(folder: Path, paths: list[Path], fraction: float, seed: int = 1) -> int:
    """Rewrite half of ``fraction`` of the files with new pixels and add as many new files;
    returns how many files changed or appeared (each: ``crops`` rows to recompute)."""
    k = max(1, round(len(paths) * fraction))
    rewrite, add = k // 2, k - k // 2
    rng = np.random.default_rng(seed)
    for p in paths[:: max(1, len(paths) // max(1, rewrite))][:rewrite]:
        p.write_bytes(_png(rng))
    for j in range(add):
        cls = folder / f"class{j % CLASSES:03d}"
        (cls / f"new{j:07d}.png").write_bytes(_png(rng))
    return k


def make_dag(path: Path, folder: Path, crops: int, chunk_size: int) -> Path:
    dag = {"name": "scale", "error_budget": 0.0, "chunk_size": chunk_size, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(folder), "crops_per_image": crops, "size": 32,
                            "min_scale": 0.9, "max_scale": 0.9}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": True},
                   "resources": {"batch_size": 64}},
    }}
    path.write_text(yaml.safe_dump(dag))
    return path


# -- the synthetic state ----------------------------------------------------------------------
def _digests(ids: list[str]) -> list[str]:
    return [hashlib.blake2b(i.encode(), digest_size=16).hexdigest() for i in ids]


def _repeat_list(value: list[int], n: int, type_: Any) -> Any:
    import pyarrow as pa

    flat = pa.array(np.tile(np.asarray(value, np.int32), n), pa.int32())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * len(value), pa.int32())
    return pa.ListArray.from_arrays(offsets, flat, type=type_)


def commit_groups(units: int, batch: int, rows_per_unit: int, chunk: int) -> list[range]:
    """The units (files, rows) each commit of a run holds: results come ``batch`` units at a
    time (``resources.batch_size``) and the driver commits once ``chunk`` rows are pending
    (``MapStage.run``; exact for the in-process executor, close for Ray's)."""
    groups, start, pending = [], 0, 0
    for b in range(0, units, batch):
        e = min(units, b + batch)
        pending += (e - b) * rows_per_unit
        if pending >= chunk:
            groups.append(range(start, e))
            start, pending = e, 0
    if start < units:
        groups.append(range(start, units))
    return groups


def seed(dag_path: Path, storage: Path) -> dict[str, Any]:
    """Write the tables and stage records a completed run of the DAG leaves (module docs);
    returns {stage: fingerprint} and the row count."""
    import datetime as dt

    import pyarrow as pa

    from pipelines.dag.planner import plan_stage
    from pipelines.dag.spec import load_dag
    from pipelines.dag.state import StageState
    from pipelines.stages.base import OutputRef, SourceStage, json_dumps
    from pipelines.stages.tokenize import ImageTokenizeStage
    from vgen_core.data import TableStore
    from vgen_core.data.schemas import (BIT_TOKENS, IMAGE_SAMPLES, QUARANTINE, SCHEMA_VERSION,
                                        SOURCE_ITEMS)
    from vgen_core.data.sample_images import encode_png

    dag = load_dag(dag_path, storage=str(storage))
    store = TableStore(dag.spec.storage)
    state = StageState(store)
    chunk = dag.spec.chunk_size

    def record(plan: Any, kind: str, outputs: dict[str, OutputRef], n: int) -> None:
        common = dict(dag=dag.name, stage=plan.stage, kind=kind, fingerprint=plan.fingerprint,
                      parts=plan.parts)
        state.record(**common, status="started")
        state.record(**common, status="completed",
                     outputs={k: v.to_json() for k, v in outputs.items()},
                     counts={"processed": n, "skipped": 0, "quarantined": 0, "filtered": 0})

    def refs(name: str, q_name: str, digest: str | None) -> dict[str, OutputRef]:
        return {"samples": OutputRef("table", name, store.uri(name), store.version(name),
                                     digest),
                "quarantine": OutputRef("table", q_name, store.uri(q_name),
                                        store.version(q_name))}

    # images: the curated table, its sources record, its stage records
    plan_i, images = plan_stage(dag, "images", store, {}, {}, None, None, count_work=False)
    assert isinstance(images, SourceStage) and plan_i.fingerprint is not None
    items = images.list_items()
    per_item = items["sample_ids"].to_pylist()
    crops = len(per_item[0])
    ids = [i for group in per_item for i in group]
    n = len(ids)
    digests = _digests(ids)
    labels = np.repeat(np.asarray(items["label"].to_pylist(), np.int32), crops)
    paths = items["path"].to_pylist()
    png = encode_png(np.full((32, 32, 3), 128, np.uint8))
    curated = pa.table({
        "sample_id": ids, "content_digest": digests,
        "source": pa.array(np.repeat(np.asarray(paths, object), crops), pa.string()),
        "image_png": pa.array([png] * n, pa.binary()),
        "height": pa.array(np.full(n, 32, np.int32)), "width": pa.array(np.full(n, 32, np.int32)),
        "label": pa.array(labels), "caption": pa.nulls(n, pa.string()),
    }, schema=IMAGE_SAMPLES)
    name_i, q_i, src_i = (images.table_name(), images.table_name("__quarantine"),
                          images.sources_table())
    meta_i = {"vgen.stage": "images", "vgen.fingerprint": images.ctx.row_fingerprint,
              "vgen.schema_version": str(SCHEMA_VERSION)}
    store.create(name_i, IMAGE_SAMPLES)
    store.create(q_i, QUARANTINE)
    store.create(src_i, SOURCE_ITEMS)
    keys, stamps = items["item_key"].to_pylist(), items["item_stamp"].to_pylist()
    for g in commit_groups(len(keys), dag.stage("images").resources.batch_size, crops, chunk):
        s, e = g.start, g.stop
        store.append(name_i, curated.slice(s * crops, (e - s) * crops), commit_metadata=meta_i)
        now = dt.datetime.now(dt.timezone.utc)
        store.append(src_i, pa.table({
            "item_key": keys[s:e], "item_stamp": stamps[s:e],
            "fingerprint": [images.ctx.row_fingerprint] * (e - s),
            "rows": per_item[s:e], "recorded_at": [now] * (e - s)}, schema=SOURCE_ITEMS),
            commit_metadata={"vgen.stage": "images"})
    out_i = refs(name_i, q_i, None)
    record(plan_i, "ingest.images", out_i, n)

    # tokens: the side table (one real row's payload on every row), the tokenizer export
    inputs = {"images": out_i}
    plan_t, tokens = plan_stage(dag, "tokens", store, inputs, {"images": plan_i.fingerprint},
                                None, None, count_work=False)
    assert isinstance(tokens, ImageTokenizeStage)
    tokenizer = tokens.export_tokenizer()
    tokens.setup()
    one = tokens.process_batch(curated.slice(0, 1)).rows.to_pylist()[0]
    fp = tokens.ctx.row_fingerprint
    side = pa.table({
        "sample_id": curated["sample_id"], "content_digest": curated["content_digest"],
        "fingerprint": pa.array([fp] * n, pa.string()), "label": curated["label"],
        "caption": pa.nulls(n, pa.string()),
        "grid_h": pa.array(np.full(n, one["grid_h"], np.int16)),
        "grid_w": pa.array(np.full(n, one["grid_w"], np.int16)),
        "token_bits": pa.array(np.full(n, one["token_bits"], np.int16)),
        "indices": _repeat_list(one["indices"], n, BIT_TOKENS.field("indices").type),
        "bits_packed": pa.array([one["bits_packed"]] * n, pa.binary()),
        "indices_flip": _repeat_list(one["indices_flip"], n,
                                     BIT_TOKENS.field("indices_flip").type),
    }, schema=BIT_TOKENS)
    name_t, q_t = tokens.table_name(), tokens.table_name("__quarantine")
    extra = tokens.commit_metadata()
    meta_t = {"vgen.stage": "tokens", "vgen.fingerprint": fp,
              "vgen.schema_version": str(SCHEMA_VERSION), **extra}
    store.create(name_t, BIT_TOKENS, description=json_dumps(extra))
    store.create(q_t, QUARANTINE)
    for g in commit_groups(n, dag.stage("tokens").resources.batch_size, 1, chunk):
        store.append(name_t, side.slice(g.start, len(g)), commit_metadata=meta_t)
    out_t = {**refs(name_t, q_t, fp), "source": tokens.samples_input(), "tokenizer": tokenizer}
    record(plan_t, "tokenize.fsq", out_t, n)
    return {"images": plan_i.fingerprint, "tokens": plan_t.fingerprint, "rows": n,
            "files": len(keys), "commits": store.version(name_i)}


# -- running the CLI --------------------------------------------------------------------------
#: Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. Measuring through this small process
#: matters: a child forked straight from this (large, after seeding 10^6 rows) process starts
#: with this process's RSS high-water mark, which Linux keeps across fork and exec.
_PEAK_RSS = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); "
             "_, s, u = os.wait4(p.pid, 0); open(sys.argv[1], 'w').write(str(u.ru_maxrss)); "
             "sys.exit(os.waitstatus_to_exitcode(s))")


def vgen(args: list[str], log: Path) -> tuple[float, float, str]:
    """Run the CLI in a fresh process; returns (wall seconds, its peak RSS in MiB, output)."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    rss = log.with_suffix(".rss")
    with open(log, "w") as f:
        f.write(f"$ vgen {' '.join(args)}\n")
        f.flush()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(rss), sys.executable, "-m",
                            "pipelines.cli", *args], env=env, cwd=ROOT, stdout=f,
                           stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
    out = log.read_text()
    if p.returncode:
        raise RuntimeError(f"vgen {args[0]} failed ({p.returncode}); see {log}:\n{out[-3000:]}")
    return dt, int(rss.read_text()) / 1024, out  # ru_maxrss: KiB on Linux


def stage_counts(output: str) -> dict[str, tuple[str, int]]:
    """{stage: (action, processed)} from a run's final table."""
    return {m[1]: (m[2], int(m[3]))
            for m in re.finditer(r"^(images|tokens)\s+(\w+)\s+(\d+)\s+\d+", output, re.M)}


def stage_seconds(output: str) -> dict[str, float]:
    """{"dag": seconds `vgen run` reports for the DAG, stage: seconds} from a run's output (the
    rest of the wall time is process start-up: imports, MLflow)."""
    secs = {m[1]: float(m[2]) for m in re.finditer(r"^\[(\w+)\] done in ([\d.]+)s", output,
                                                     re.M)}
    dag = re.search(r"^DAG '.*' finished in ([\d.]+)s", output, re.M)
    return {"dag": float(dag[1]) if dag else float("nan"), **secs}


def plan_states(output: str) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in json.loads(output[output.index("\n{") + 1:])["stages"]}


# -- one point of a series --------------------------------------------------------------------
def measure(work: Path, series: str, n_files: int, crops: int, args: argparse.Namespace,
            full: bool) -> dict[str, Any]:
    point = work / f"{series}-{n_files}x{crops}"
    logs = point / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    folder = point / "images"
    t0 = time.perf_counter()
    paths = write_folder(folder, n_files)
    t_folder = time.perf_counter() - t0
    dag = make_dag(point / "dag.yaml", folder, crops, args.chunk_size)
    storage = point / "store"
    t0 = time.perf_counter()
    seeded = seed(dag, storage)
    t_seed = time.perf_counter() - t0
    rows = seeded["rows"]
    r: dict[str, Any] = {"series": series, "rows": rows, "files": n_files, "crops": crops,
                         "folder_s": t_folder, "seed_s": t_seed, "commits": seeded["commits"]}
    base = ["--storage", str(storage), "--tracking-uri", f"sqlite:///{point}/mlflow.db"]

    def best(cmd: str, tag: str, where: list[str]) -> tuple[float, float, str]:
        runs = [vgen([cmd, str(dag), *where], logs / f"{tag}{i}.log")
                for i in range(args.repeat)]
        return min(runs, key=lambda x: x[0])

    # checks: the seeded state is what a completed run leaves
    _, _, out = vgen(["plan", str(dag), *base, "--format", "json"], logs / "check_plan.log")
    states = plan_states(out)
    bad = {k: v["reason"] for k, v in states.items() if v["state"] != "up-to-date"}
    if bad:
        raise RuntimeError(f"seeded state is not up-to-date for vgen plan: {bad}")
    r["warmup_s"], _, out = vgen(["run", str(dag), *base], logs / "warmup.log")
    if {a for a, _ in stage_counts(out).values()} != {"skipped"}:
        raise RuntimeError(f"the no-op warm-up ran something: {stage_counts(out)}")

    r["plan_s"], r["plan_mib"], _ = best("plan", "plan", base)
    r["noop_s"], r["noop_mib"], _ = best("run", "noop", base)

    if full:  # a real full run on an empty root over the same folder, before the change
        real = point / "store_real"
        real_base = ["--storage", str(real), "--tracking-uri", f"sqlite:///{point}/mlflow.db"]
        r["full_s"], r["full_mib"], out = vgen(["run", str(dag), *real_base],
                                               logs / "full.log")
        r["full_parts"] = stage_seconds(out)
        got = stage_counts(out)
        if got != {"images": ("ran", rows), "tokens": ("ran", rows)}:
            raise RuntimeError(f"full run: expected {rows} rows in each stage, got {got}")
        _, _, out = vgen(["plan", str(dag), *real_base, "--format", "json"],
                         logs / "real_plan_json.log")
        fps = {k: v["fingerprint"] for k, v in plan_states(out).items()}
        seeded_fps = {k: seeded[k] for k in ("images", "tokens")}
        r["fingerprints_match"] = fps == seeded_fps
        r["real_plan_s"], r["real_plan_mib"], _ = best("plan", "real_plan", real_base)
        r["real_noop_s"], r["real_noop_mib"], _ = best("run", "real_noop", real_base)

    k = change_files(folder, paths, args.changed)
    r["changed_rows"] = k * crops
    r["plan1_s"], r["plan1_mib"], out = vgen(["plan", str(dag), *base], logs / "plan1.log")
    r["run1_s"], r["run1_mib"], out = vgen(["run", str(dag), *base], logs / "run1.log")
    r["run1_parts"] = stage_seconds(out)
    got = stage_counts(out)
    want = {"images": ("ran", k * crops), "tokens": ("ran", k * crops)}
    if got != want:
        raise RuntimeError(f"1% run: expected {want}, got {got}; see {logs / 'run1.log'}")
    if not args.keep:
        shutil.rmtree(point, ignore_errors=True)
    return r


# -- report -----------------------------------------------------------------------------------
def _exp(a: dict, b: dict, key: str) -> str:
    if a[key] <= 0 or b[key] <= 0 or a["rows"] == b["rows"]:
        return "n/a"
    return f"{math.log(b[key] / a[key]) / math.log(b['rows'] / a['rows']):.2f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for series in ("rows", "files"):
        rs = [r for r in results if r["series"] == series]
        if not rs:
            continue
        print(f"\nseries '{series}' ({rs[0]['crops']} crops a file; chunk_size "
              f"{args.chunk_size}; best of {args.repeat} for plan and no-op)")
        print(f"{'rows':>9} {'files':>8} {'commits':>7} {'seed s':>7} | {'plan s':>7} {'MiB':>5}"
              f" | {'no-op s':>7} {'MiB':>5} | {'1% plan s':>9} {'MiB':>5} | {'1% run s':>8} "
              f"{'MiB':>5} {'rows':>6}")
        for r in rs:
            print(f"{r['rows']:>9,} {r['files']:>8,} {r['commits']:>7} {r['seed_s']:>7.1f} | "
                  f"{r['plan_s']:>7.2f} {r['plan_mib']:>5.0f} | {r['noop_s']:>7.2f} "
                  f"{r['noop_mib']:>5.0f} | {r['plan1_s']:>9.2f} {r['plan1_mib']:>5.0f} | "
                  f"{r['run1_s']:>8.1f} {r['run1_mib']:>5.0f} {r['changed_rows']:>6,}")
        for r in rs:
            p = r["run1_parts"]
            print(f"  1% run at {r['rows']:,} rows: DAG {p['dag']:.1f} s (images "
                  f"{p.get('images', float('nan')):.1f} s, tokens "
                  f"{p.get('tokens', float('nan')):.1f} s; the rest: planning, Ray start, "
                  f"MLflow), process start-up and exit {r['run1_s'] - p['dag']:.1f} s")
        for a, b in zip(rs, rs[1:]):
            print(f"  growth {a['rows']:,} -> {b['rows']:,} rows (d log t / d log N): plan "
                  f"{_exp(a, b, 'plan_s')}, no-op {_exp(a, b, 'noop_s')}, 1% plan "
                  f"{_exp(a, b, 'plan1_s')}, 1% run {_exp(a, b, 'run1_s')}; memory: plan "
                  f"{_exp(a, b, 'plan_mib')}, no-op {_exp(a, b, 'noop_mib')}")
        for r in rs:
            if "full_s" in r:
                p = r["full_parts"]
                print(f"  real full run at {r['rows']:,} rows: {r['full_s']:.1f} s (DAG "
                      f"{p['dag']:.1f} s: images {p.get('images', float('nan')):.1f} s, tokens "
                      f"{p.get('tokens', float('nan')):.1f} s), "
                      f"{r['full_mib']:.0f} MiB driver; on its real root: plan "
                      f"{r['real_plan_s']:.2f} s / {r['real_plan_mib']:.0f} MiB, no-op "
                      f"{r['real_noop_s']:.2f} s / {r['real_noop_mib']:.0f} MiB (simulated: "
                      f"{r['plan_s']:.2f} s, {r['noop_s']:.2f} s); fingerprints as seeded: "
                      f"{'yes' if r['fingerprints_match'] else 'NO'}")

    rows = [r for r in results if r["series"] == "rows"]
    fulls = sorted((r["rows"], r["full_s"]) for r in rows if "full_s" in r)
    if fulls:
        if len(fulls) >= 2:
            (n0, t0), (n1, t1) = fulls[-2], fulls[-1]
            rate = (t1 - t0) / (n1 - n0)
            how = f"marginal rate {rate * 1e3:.2f} ms/row between {n0:,} and {n1:,} rows"
        else:
            (n1, t1), rate = fulls[0], fulls[0][1] / fulls[0][0]
            how = f"{rate * 1e3:.2f} ms/row at {n1:,} rows, scaled linearly"
        print(f"\nfull run: {how}")

        def full_at(n: int) -> tuple[float, str]:
            for m, t in fulls:
                if m == n:
                    return t, "measured"
            return t1 + rate * (n - n1), "extrapolated"
    print("\ngoals (the issue's): plan / no-op <= 60 s and 2 GiB at 10^6 rows, at most linear; "
          "1% change <= 0.05 x full + no-op")
    for r in results:
        tag = f"{r['series']} {r['rows']:,} rows / {r['files']:,} files"
        ok_abs = all(r[f"{k}_s"] <= GOAL_SECONDS and r[f"{k}_mib"] <= GOAL_MIB
                     for k in ("plan", "noop"))
        line = f"  {tag}: plan+no-op within 60 s / 2 GiB: {'yes' if ok_abs else 'NO'}"
        if fulls and r["series"] == "rows":
            t_full, how = full_at(r["rows"])
            bound = 0.05 * t_full + r["noop_s"]
            line += (f"; 1% run {r['run1_s']:.1f} s vs bound {bound:.1f} s (0.05 x {how} full "
                     f"{t_full:.0f} s + no-op {r['noop_s']:.1f} s): "
                     f"{'yes' if r['run1_s'] <= bound else 'NO'}; 1% cost / full = "
                     f"{r['run1_s'] / t_full:.3f}")
        print(line)


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--rows", default="1e4,1e5,1e6",
                    help="rows of the 'rows' series (comma-separated; '' skips the series)")
    ap.add_argument("--files", default="1e3,1e4,1e5",
                    help="files of the 'files' series, one crop each ('' skips it)")
    ap.add_argument("--crops", type=int, default=64, help="crops a file in the 'rows' series")
    ap.add_argument("--full", default="1e4",
                    help="row counts of the 'rows' series to run for real from empty storage "
                         "(full-run cost; '' for none)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of files changed")
    ap.add_argument("--chunk-size", type=int, default=4096, help="the DAG's chunk_size")
    ap.add_argument("--repeat", type=int, default=2, help="runs of plan and no-op (best kept)")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir (removed)")
    ap.add_argument("--keep", action="store_true", help="keep each point's folder and storage")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vgen-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    full = set(_sizes(args.full))
    points = [("rows", max(1, math.ceil(n / args.crops)), args.crops, n in full)
              for n in _sizes(args.rows)]
    points += [("files", f, 1, False) for f in _sizes(args.files)]
    print(f"scaling: ingest.images -> tokenize.fsq tiny (+flip); {os.cpu_count()} cores, load "
          f"average {os.getloadavg()[0]:.1f}; work in {work}", flush=True)
    results = []
    t_all = time.perf_counter()
    for series, files, crops, do_full in points:
        t0 = time.perf_counter()
        r = measure(work, series, files, crops, args, do_full)
        results.append(r)
        print(f"[{series} {r['rows']:,} rows, {files:,} files] plan {r['plan_s']:.2f} s "
              f"{r['plan_mib']:.0f} MiB; no-op {r['noop_s']:.2f} s {r['noop_mib']:.0f} MiB; "
              f"1% plan {r['plan1_s']:.2f} s; 1% run {r['run1_s']:.1f} s "
              f"{r['run1_mib']:.0f} MiB ({r['changed_rows']:,} rows)"
              + (f"; full {r['full_s']:.1f} s" if "full_s" in r else "")
              + f"  [seed {r['seed_s']:.0f} s, point {time.perf_counter() - t0:.0f} s]",
              flush=True)
    report(results, args)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
