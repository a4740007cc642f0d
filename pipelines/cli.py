"""``vgen``: run, plan and inspect DAGs; serve the MLflow UI.

    vgen run DAG.yaml [--storage ROOT] [--tracking-uri URI] [--address RAY]
    vgen plan DAG.yaml [--format text|json|mermaid]
    vgen status DAG.yaml [--json]
    vgen gc DAG.yaml [--dry-run]
    vgen ui [--storage ROOT | --tracking-uri URI] [--port 5000]

``--storage`` (env VGEN_STORAGE) overrides the DAG's storage root, so one DAG runs against several
roots; ``--tracking-uri`` (env MLFLOW_TRACKING_URI) likewise for MLflow. Exit codes: 0 success,
1 a stage failed, 2 invalid DAG/config or unusable storage (nothing was computed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("dag", help="path to the DAG YAML (see pipelines/configs/demo.yaml)")
    p.add_argument("--storage", default=os.environ.get("VGEN_STORAGE"),
                   help="storage root (local path or s3://bucket/prefix); overrides the DAG's "
                        "'storage:' (env VGEN_STORAGE)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI; default: sqlite:///<storage>/mlflow.db "
                        "(env MLFLOW_TRACKING_URI)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgen", description="vgen: visual-generation pipelines on Ray (curation, "
        "tokenization, DeepSpeed training, evaluation), tracked in MLflow.",
        epilog="Start with: vgen run pipelines/configs/demo.yaml  then  vgen ui")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a DAG (skips stages whose inputs and config are unchanged)",
                       description="Run every stage of a DAG that is not up to date. Uses an "
                       "embedded local Ray unless --address or RAY_ADDRESS names a cluster.")
    _common(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: env RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--local", action="store_true",
                   help="run per-sample stages in this process instead of Ray Data (debugging)")

    p = sub.add_parser("plan", help="say which stages would run and why, without running them")
    _common(p)
    p.add_argument("--format", choices=["text", "json", "mermaid"], default="text",
                   help="text table, JSON, or a Mermaid flowchart of the DAG with stage states")

    p = sub.add_parser("status", help="state, output tables (URI@version) and counts per stage")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output for scripts/CI")

    p = sub.add_parser("gc", help="delete side-table rows no current curated version references",
                       description="For every side table (tokens, latents) the DAG wrote, delete "
                       "the rows whose (sample_id, content_digest) is not in the latest version "
                       "of the curated table it was made from. Older table versions stay "
                       "readable until Delta's vacuum.")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    p = sub.add_parser("ui", help="serve the MLflow UI for a storage root on 127.0.0.1")
    p.add_argument("--storage", default=os.environ.get("VGEN_STORAGE", "./.vgen-demo"),
                   help="storage root whose MLflow store to show (default ./.vgen-demo)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    return parser


def _load(args: argparse.Namespace):
    from pipelines.dag.spec import load_dag
    from vgen_core.data import TableStore
    from vgen_core.tracking import default_tracking_uri

    dag = load_dag(args.dag, storage=args.storage, tracking=args.tracking_uri)
    store = TableStore(dag.spec.storage)
    tracking = dag.spec.tracking or default_tracking_uri(store.root)
    return dag, store, tracking


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.dag.runner import Runner
    from vgen_core.tracking import MlflowTracker

    dag, store, tracking = _load(args)
    store.check_writable()
    from vgen_core.tracking import default_artifact_location

    tracker = MlflowTracker.start(tracking, experiment=dag.name, run_name=f"{dag.name}",
                                  tags={"vgen.dag": dag.name},
                                  artifact_location=default_artifact_location(store.root))
    runner = Runner(dag, store, tracker, tracking, address=args.address,
                    executor="local" if args.local else "ray")
    summary = runner.run()
    _print_summary(summary, store)
    return EXIT_OK if summary.ok else EXIT_STAGE_FAILED


def _print_summary(summary: Any, store: Any) -> None:
    print(f"\nDAG '{summary.dag}' finished in {summary.seconds:.1f}s "
          f"({'ok' if summary.ok else 'FAILED'})")
    print(f"{'stage':<14} {'action':<8} {'processed':>9} {'skipped':>8} {'quarant.':>8} "
          f"{'filtered':>8}  outputs")
    for o in summary.outcomes.values():
        outs = ", ".join(f"{r.uri}@v{r.version}" if r.kind == "table" else r.uri
                         for k, r in o.outputs.items() if k != "quarantine")
        print(f"{o.stage:<14} {o.action:<8} {o.counts.processed:>9} {o.counts.skipped:>8} "
              f"{o.counts.quarantined:>8} {o.counts.filtered:>8}  {outs}")
        if o.error:
            print(f"  error: {o.error}")
    print(f"\nTables under: {store.root}/tables")
    print(f"MLflow: {summary.tracking_uri}  run {summary.run_id}")
    print(f"Browse: vgen ui --storage {store.root}")


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.dag.planner import plan_dag, to_mermaid
    from pipelines.dag.state import StageState

    dag, store, _ = _load(args)
    plans = plan_dag(dag, store, StageState(store))
    if args.format == "json":
        print(json.dumps({"dag": dag.name, "storage": store.root,
                          "stages": [p.to_json() for p in plans]}, indent=2))
    elif args.format == "mermaid":
        print(to_mermaid(dag, plans))
    else:
        print(f"DAG '{dag.name}' on {store.root}")
        for p in plans:
            print(f"  {p.stage:<14} {p.kind:<20} {p.state:<11} {p.reason}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.dag.planner import plan_dag
    from pipelines.dag.state import StageState

    dag, store, tracking = _load(args)
    state = StageState(store)
    plans = plan_dag(dag, store, state)
    last, done = state.latest(dag.name)
    stages = []
    for p in plans:
        rec = done.get(p.stage) or {}
        latest = last.get(p.stage) or {}
        stages.append({
            "stage": p.stage, "kind": p.kind, "state": p.state, "reason": p.reason,
            "last_status": latest.get("status"), "last_error": latest.get("error"),
            "outputs": rec.get("outputs", {}), "counts": rec.get("counts", {}),
            "mlflow_run_id": rec.get("mlflow_run_id"),
        })
    if args.json:
        print(json.dumps({"dag": dag.name, "storage": store.root, "tracking_uri": tracking,
                          "stages": stages}, indent=2, default=str))
        return EXIT_OK
    print(f"DAG '{dag.name}' on {store.root} (MLflow {tracking})")
    for s in stages:
        c = s["counts"]
        print(f"  {s['stage']:<14} {s['state']:<11} processed={c.get('processed', 0)} "
              f"skipped={c.get('skipped', 0)} quarantined={c.get('quarantined', 0)} "
              f"filtered={c.get('filtered', 0)}")
        for k, o in s["outputs"].items():
            print(f"      {k}: {o['uri']}" + (f"@v{o['version']}" if o.get("version") is not None
                                             else ""))
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from pipelines.dag.gc import gc_dag

    dag, store, _ = _load(args)
    results = gc_dag(dag, store, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for r in results:
        print(f"{store.uri(r.table)}: {verb} {r.stale} stale rows (source {r.source}); "
              f"version {r.version}")
    if not results:
        print("no side tables recorded for this DAG yet")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from vgen_core.data import TableStore
    from vgen_core.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(TableStore(args.storage).root)
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    from pipelines.dag.spec import DagError
    from vgen_core.data import StorageError

    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "gc": cmd_gc,
               "ui": cmd_ui}[args.command]
    try:
        return handler(args)
    except DagError as e:
        print(f"vgen: invalid DAG: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as e:
        print(f"vgen: storage error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
