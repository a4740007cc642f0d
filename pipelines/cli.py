"""``vgen``: run, plan and inspect DAGs; serve the MLflow UI.

    vgen run DAG.yaml [--storage ROOT] [--tracking-uri URI] [--address RAY] [--verify-sources]
    vgen plan DAG.yaml [--format text|json|mermaid] [--verify-sources]
    vgen status DAG.yaml [--json]
    vgen gc DAG.yaml [--dry-run]
    vgen ui [--storage ROOT | --tracking-uri URI] [--port 5000]
    vgen plan DAG.yaml --cluster --address http://HEAD:8265   # pool sizes on that cluster
    vgen submit DAG.yaml --address http://HEAD:8265 [--storage s3://...] [--wait]
    vgen status --job ID --address http://HEAD:8265 [--json]
    vgen logs ID --address http://HEAD:8265 [--follow]
    vgen stop ID --address http://HEAD:8265
    vgen report RUN_ID [RUN_ID ...] [--storage ROOT | --tracking-uri URI] [--out report.html]
    vgen tracking sync [--storage ROOT | --tracking-uri URI]  # replay records of an MLflow outage

``--storage`` (env VGEN_STORAGE) overrides the DAG's storage root, so one DAG runs against several
roots; ``--tracking-uri`` (env MLFLOW_TRACKING_URI) likewise for MLflow. Exit codes: 0 success,
1 a stage failed, 2 invalid DAG/config or unusable storage (nothing was computed). A config that
points at a data root or file that cannot be read (``with.root``, ``weights:``, ...) is invalid:
``vgen run`` refuses it before Ray starts or an MLflow run is opened, one ``vgen: invalid DAG:
FILE: stage 'S': field 'with.F': ...`` line per problem on stderr; ``vgen plan`` / ``vgen status``
show every stage (the bad ones as ``invalid``), print the same lines and exit 2. The cluster
commands (see :mod:`pipelines.submit`): 0 ok or the job is pending/running/succeeded, 1 the job
failed or was stopped, 2 nothing could be done (unreachable cluster, unknown job, bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser, dag_optional: bool = False) -> None:
    p.add_argument("dag", nargs="?" if dag_optional else None,
                   help="path to the DAG YAML (see pipelines/configs/demo.yaml)")
    p.add_argument("--storage", default=os.environ.get("VGEN_STORAGE"),
                   help="storage root (local path or s3://bucket/prefix); overrides the DAG's "
                        "'storage:' (env VGEN_STORAGE)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI; default: sqlite:///<storage>/mlflow.db "
                        "(env MLFLOW_TRACKING_URI)")


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the Ray cluster: its head's dashboard URL http://HEAD:8265 (default: env "
                        "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")


def _verify_sources(p: argparse.ArgumentParser, plan: bool = False) -> None:
    what = "plan as if source stages" if plan else "source stages"
    p.add_argument("--verify-sources", action="store_true",
                   help=f"{what} (ingest.*, curate.*) read every listed file and compare "
                        "contents (sample digests) instead of trusting size + mtime: finds files "
                        "rewritten with the same size and mtime (a restore, rsync -t); only "
                        "samples whose content changed are written and recomputed downstream. "
                        "Costs a full read. Per stage: verify_sources: true in the DAG")


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
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: env RAY_ADDRESS, else an embedded local Ray)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="run per-sample stages in this process instead of Ray Data (debugging)",
    )
    _verify_sources(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also stream Ray's, DeepSpeed's and MLflow's own output to the console "
                        "(it always goes to the run's log file, whose path is printed)")

    p = sub.add_parser("plan", help="say which stages would run and why, without running them")
    _common(p)
    p.add_argument(
        "--format",
        choices=["text", "json", "mermaid"],
        default="text",
        help="text table, JSON, or a Mermaid flowchart of the DAG with stage states",
    )
    _verify_sources(p, plan=True)
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also say what each stage gets on the cluster at --address (its CPUs, "
        "GPUs and the actor-pool / train-worker sizes the runner would use)",
    )
    _address(p)

    p = sub.add_parser(
        "status",
        help="state, output tables (URI@version) and counts per stage; "
        "or, with --job, the state of a submitted job",
    )
    _common(p, dag_optional=True)
    p.add_argument("--json", action="store_true", help="machine-readable output for scripts/CI")
    p.add_argument(
        "--job",
        metavar="ID",
        help="a job id printed by `vgen submit`: show its "
        "status on the cluster at --address instead of a DAG's",
    )
    _address(p)

    p = sub.add_parser(
        "gc",
        help="delete side-table rows no current curated version references",
        description="For every side table (tokens, latents) the DAG wrote, delete "
        "the rows whose (sample_id, content_digest) is not in the latest version "
        "of the curated table it was made from. Older table versions stay "
        "readable until Delta's vacuum.",
    )
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    p = sub.add_parser(
        "submit",
        help="run a DAG on a Ray cluster as a Ray job (Jobs API)",
        description="Validate the DAG here, then submit `vgen run DAG ...` to the "
        "cluster's Jobs API with a runtime_env built from this project (code as "
        "working_dir or py_modules; dependencies come from the cluster image). "
        "Prints the job id. See pipelines/submit.py and infra/README.md.",
    )
    _common(p)
    _address(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 if it succeeded, else 1",
    )
    p.add_argument(
        "--code",
        choices=["auto", "project", "modules", "image"],
        default="auto",
        help="what code travels with the job: the project root as working_dir, its "
        "packages as py_modules, or none (the image's vgen); auto: project when "
        "the DAG is inside the project, else modules",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="an env var for the job (KEY alone copies this machine's value); "
        "repeatable. Keep credentials on the cluster, not here",
    )
    p.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="a runtime_env YAML to start from (e.g. infra/runtime_env.yaml)",
    )
    p.add_argument("--submission-id", help="job id to use (default vgen-<dag>-<time>-<random>)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the entrypoint and runtime_env as JSON; submit nothing",
    )

    p = sub.add_parser("logs", help="print (or --follow) the logs of a submitted job")
    p.add_argument("job", metavar="ID", help="job id printed by `vgen submit`")
    _address(p)
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep streaming until the job ends; exit 0 if it succeeded, else 1",
    )

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job", metavar="ID", help="job id printed by `vgen submit`")
    _address(p)
    p.add_argument("--wait", action="store_true", help="return once the job has stopped")

    p = sub.add_parser("ui", help="serve the MLflow UI for a storage root on 127.0.0.1")
    p.add_argument(
        "--storage",
        default=os.environ.get("VGEN_STORAGE", "./.vgen-demo"),
        help="storage root whose MLflow store to show (default ./.vgen-demo)",
    )
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--workers", type=int, default=1, help="server worker processes (default 1: one user)"
    )

    p = sub.add_parser(
        "families",
        help="list the model families: role, sizes, and what each can "
        "do (train / tokenize / encode / decode / sample / evaluate / ...)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"families": [{"name", "role", "sizes", "capabilities"}, ...]}',
    )

    p = sub.add_parser(
        "weights", help="inspect a weights file (vgen export or released checkpoint)"
    )
    wsub = p.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser(
        "inspect",
        help="family, size, pixel range, tensors and bytes, digests; for a released checkpoint "
        "the best-matching family / size and the key differences (the names to pass to convert)",
    )
    p.add_argument("path", help="an export folder, a .safetensors, or a .bin / .pt / .pth / .ckpt "
                   "(read with torch.load(weights_only=True) only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = wsub.add_parser(
        "convert",
        help="load a released checkpoint into a family / size strictly and write a vgen export "
        "(config.json + model.safetensors + manifest.json); exit 2 with the key diff if it "
        "does not fit",
    )
    p.add_argument("src", help="released checkpoint: .safetensors (or an HF snapshot folder), or "
                   ".bin / .pt / .pth / .ckpt read with torch.load(weights_only=True) only")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--family", required=True, help="model family (see `vgen families`; "
                   "`vgen weights inspect SRC` names the best match)")
    p.add_argument("--size", required=True, help="the family's size the checkpoint is")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="config override (repeatable), e.g. --set token_bits=12")
    p.add_argument("--pixel-range", choices=["signed", "unit"], default=None,
                   help="the range the weights were trained on when it is not the family's "
                   "(stages feeding the family's range then refuse the export)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    from pipelines.report import add_report_parser
    from pipelines.tracking_cli import add_tracking_parser

    add_report_parser(sub)
    add_tracking_parser(sub)
    return parser


def cmd_families(args: argparse.Namespace) -> int:
    """Every registered :class:`~vgen_core.families.FamilySpec`, as a table or JSON."""
    from vgen_core import families

    specs = families.all_specs()
    if args.json:
        print(json.dumps({"families": [s.to_json() for s in specs]}, indent=2))
        return EXIT_OK
    rows = [
        (
            s.name + (f" ({', '.join(s.aliases)})" if s.aliases else ""),
            s.role,
            ", ".join(s.sizes),
            ", ".join(s.capabilities),
        )
        for s in specs
    ]
    widths = [max(len(r[i]) for r in rows + [("family", "role", "", "")]) for i in range(2)]
    print(f"{'family':<{widths[0]}}  {'role':<{widths[1]}}  capabilities / sizes")
    for name, role, sizes, caps in rows:
        print(f"{name:<{widths[0]}}  {role:<{widths[1]}}  {caps or '-'}")
        print(f"{'':<{widths[0]}}  {'':<{widths[1]}}    sizes: {sizes}")
    return EXIT_OK


def _load(args: argparse.Namespace):
    from pipelines.dag.spec import load_dag
    from vgen_core.data import TableStore
    from vgen_core.tracking import default_tracking_uri

    dag = load_dag(args.dag, storage=args.storage, tracking=args.tracking_uri)
    store = TableStore(dag.spec.storage)
    tracking = dag.spec.tracking or default_tracking_uri(store.root)
    return dag, store, tracking


def cmd_run(args: argparse.Namespace) -> int:
    from vgen_core.tracking.sidecar import TrackingSidecar, sidecar_enabled

    # MLflow's import and store open (~2 s of CPU) run in a child process from here on, beside
    # the planning and the work (vgen_core.tracking.sidecar); VGEN_TRACKING_SIDECAR=0: inline
    sidecar = TrackingSidecar.spawn() if sidecar_enabled() else None
    try:
        return _run(args, sidecar)
    finally:
        if sidecar is not None:  # a run closes it inside its log capture; this is the rest
            sidecar.close()


def _run(args: argparse.Namespace, sidecar: Any) -> int:
    from pipelines.console import run_log_path
    from pipelines.dag.planner import require_valid_config
    from pipelines.dag.runner import Runner
    from vgen_core.tracking import default_artifact_location
    from vgen_core.tracking.redact import redact_text

    dag, store, tracking = _load(args)
    require_valid_config(dag, store)  # before the MLflow run, Ray and any write: exit 2
    store.check_writable()
    log_file, log_uri = run_log_path(store.root, dag.name)
    shown = log_uri or log_file
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    restore_sigterm = _sigterm_as_interrupt()  # `vgen stop`, a pod eviction: clean up, upload
    try:
        with _run_console(log_file, verbose=args.verbose) as (console, out):
            console.print(f"vgen: DAG '{dag.name}' ({dag.source}), storage {store.root}")
            console.print(f"vgen: log file {shown}" + ("" if args.verbose else
                          " (Ray, DeepSpeed and MLflow output; --verbose streams it here)"))
            unfinished = None  # the status of MLflow runs left open when the run stops early
            try:
                if sidecar is not None:
                    start = sidecar.start
                else:
                    from vgen_core.tracking import MlflowTracker

                    start = MlflowTracker.start
                tracker = start(
                    tracking, experiment=dag.name, run_name=f"{dag.name}",
                    tags={"vgen.dag": dag.name, "vgen.log_file": shown},
                    artifact_location=default_artifact_location(store.root))
                runner = Runner(dag, store, tracker, tracking, address=args.address,
                                executor="local" if args.local else "ray",
                                verify_sources=args.verify_sources, console=console,
                                log_path=shown)
                summary = runner.run()
            except BaseException as e:
                unfinished = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                traceback.print_exc()  # into the log file (the captured stderr)
                console.print(redact_text(f"vgen: the run stopped: {type(e).__name__}: {e}")
                              [:2000])
                console.print(f"vgen: details in {shown}")
                raise
            finally:
                # Ray's log monitor prints worker lines until Ray stops: stop it while they
                # still go to the log file (only a Ray this command started)
                if (not ray_before and "ray" in sys.modules
                        and sys.modules["ray"].is_initialized()):
                    sys.modules["ray"].shutdown()
                if sidecar is not None:  # every record applied; its output into the log file
                    sidecar.close(unfinished=unfinished)
            _print_summary(summary, store, out)
            print(f"Log:    {shown}", file=out)
    finally:
        restore_sigterm()
        if log_uri:  # after the capture: the file is complete and a failure shows
            _upload_log(log_file, log_uri)
    return EXIT_OK if summary.ok else EXIT_STAGE_FAILED


def _sigterm_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt (so ``finally`` blocks run: Ray stops, the log is
    uploaded) until the returned function restores the previous handler. A no-op off the main
    thread (vgen embedded in another program)."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _run_console(log_file: str, *, verbose: bool):
    """``(Console, stdout stream)`` for ``vgen run``: library output to ``log_file``
    (:func:`pipelines.console.capture_output`). When ``sys.stdout`` / ``sys.stderr`` are not the
    process's own descriptors (vgen embedded in another program, pytest's capsys) nothing is
    redirected and the console writes to them."""
    import logging

    from pipelines.console import Console, capture_output, vgen_warnings_to

    if not verbose:  # Ray Data's per-operator bars: redrawn lines that fill a log
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        own = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        own = False
    logging.basicConfig(level=logging.WARNING,  # library records: the log file, with time
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not own:
        console = Console(sys.stderr)
        with vgen_warnings_to(console):
            yield console, sys.stdout
        return
    with capture_output(log_file, verbose=verbose) as (err, out):
        # --verbose copies raw output onto the same terminal: a redrawn block would garble it
        console = Console(err, live=False if verbose else None)
        try:
            with vgen_warnings_to(console):
                yield console, out
        finally:
            console.close()


def _upload_log(local: str, uri: str) -> None:
    """Copy the run's log file to the object-store root (best effort: a warning if it fails)."""
    from vgen_core.data.fsio import filesystem_for

    try:
        fs, path = filesystem_for(uri)
        fs.put(local, path)
    except Exception as e:
        print(f"vgen: could not copy the log file to {uri} ({type(e).__name__}: {e}); it is "
              f"at {local}", file=sys.stderr)
        return
    import shutil

    shutil.rmtree(os.path.dirname(local), ignore_errors=True)  # the private temp folder


def _print_summary(summary: Any, store: Any, out: Any = None) -> None:
    """The final table: one row per stage with its counts and outputs; a training stage adds
    its steps and final loss, a failed one its error."""
    from vgen_core.tracking.redact import redact_text, redact_uri

    out = out or sys.stdout
    lines = [f"\nDAG '{summary.dag}' finished in {summary.seconds:.1f}s "
             f"({'ok' if summary.ok else 'FAILED'})",
             f"{'stage':<14} {'action':<8} {'processed':>9} {'skipped':>8} {'quarant.':>8} "
             f"{'filtered':>8} {'seconds':>8}  outputs"]
    for o in summary.outcomes.values():
        outs = ", ".join(f"{r.uri}@v{r.version}" if r.kind == "table" else r.uri
                         for k, r in o.outputs.items() if k != "quarantine")
        lines.append(f"{o.stage:<14} {o.action:<8} {o.counts.processed:>9} "
                     f"{o.counts.skipped:>8} {o.counts.quarantined:>8} {o.counts.filtered:>8} "
                     f"{o.seconds:>8.1f}  {outs}")
        m = o.metrics or {}
        if "final.step" in m:
            lines.append(f"  trained {int(m['final.step'])} steps"
                         + (f", final loss {m['final.loss']:.4g}" if "final.loss" in m else ""))
        if o.error:
            lines.append(f"  error: {redact_text(o.error)}")
    lines += [f"\nTables under: {store.root}/tables",
              f"MLflow: {redact_uri(summary.tracking_uri)}  run {summary.run_id}",
              f"Browse: vgen ui --storage {store.root}"]
    print("\n".join(lines), file=out, flush=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.dag.planner import check_dag, plan_dag, to_mermaid
    from pipelines.dag.state import StageState

    dag, store, _ = _load(args)
    cluster = alloc = None
    if args.cluster:
        from pipelines.submit import cluster_resources, stage_allocations

        cluster = cluster_resources(args.address)
        alloc = stage_allocations(dag, cluster)
    problems = check_dag(dag, store)
    plans = plan_dag(dag, store, StageState(store), problems, verify_sources=args.verify_sources)
    if args.format == "json":
        out: dict[str, Any] = {
            "dag": dag.name,
            "storage": store.root,
            "stages": [p.to_json() for p in plans],
        }
        if cluster is not None and alloc is not None:
            out["cluster"] = cluster
            for s in out["stages"]:
                s["cluster"] = alloc[s["stage"]]
        print(json.dumps(out, indent=2))
    elif args.format == "mermaid":
        print(to_mermaid(dag, plans))
    else:
        print(f"DAG '{dag.name}' on {store.root}")
        if cluster is not None:
            print(
                f"cluster {cluster['address']}: {cluster['nodes']} node(s), "
                f"{cluster['CPU']:g} CPUs, {cluster['GPU']:g} GPUs"
            )
        for p in plans:
            print(f"  {p.stage:<14} {p.kind:<20} {p.state:<11} {p.reason}")
            if p.sources:  # how this run finds changed source files
                print(f"  {'':<14} sources: {p.sources}")
            if alloc is not None:
                print(f"  {'':<14} on the cluster: {alloc[p.stage]['text']}")
    return _report_problems(problems)


def _report_problems(problems: dict) -> int:
    """``vgen plan`` / ``vgen status``: one stderr line per config problem; exit 2 if any."""
    for errs in problems.values():
        for e in errs:
            print(f"vgen: invalid DAG: {e}", file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.dag.planner import check_dag, plan_dag
    from pipelines.dag.state import StageState
    from pipelines.stages.results import final_metrics

    if args.job:
        return _job_status(args)
    if not args.dag:
        print(
            "vgen status: give a DAG file, or --job ID (with --address) for a submitted job",
            file=sys.stderr,
        )
        return EXIT_USAGE
    dag, store, tracking = _load(args)
    state = StageState(store)
    problems = check_dag(dag, store)
    plans = plan_dag(dag, store, state, problems)
    last, done = state.latest(dag.name)
    stages = []
    for p in plans:
        rec = done.get(p.stage) or {}
        latest = last.get(p.stage) or {}
        stages.append(
            {
                "stage": p.stage,
                "kind": p.kind,
                "state": p.state,
                "reason": p.reason,
                "last_status": latest.get("status"),
                "last_error": latest.get("error"),
                "outputs": rec.get("outputs", {}),
                "counts": rec.get("counts", {}),
                "mlflow_run_id": rec.get("mlflow_run_id"),
                # evaluate stages: the final metrics of the recorded run (its results table)
                "metrics": final_metrics(store, rec.get("outputs", {}))
                if p.kind.startswith("evaluate.") else {},
            }
        )
    if args.json:
        from vgen_core.tracking.redact import redact_uri

        print(
            json.dumps(
                {
                    "dag": dag.name,
                    "storage": store.root,
                    "tracking_uri": redact_uri(tracking),
                    "stages": stages,
                },
                indent=2,
                default=str,
            )
        )
        return _report_problems(problems)
    from vgen_core.tracking.redact import redact_uri

    print(f"DAG '{dag.name}' on {store.root} (MLflow {redact_uri(tracking)})")
    for s in stages:
        c = s["counts"]
        print(
            f"  {s['stage']:<14} {s['state']:<11} processed={c.get('processed', 0)} "
            f"skipped={c.get('skipped', 0)} quarantined={c.get('quarantined', 0)} "
            f"filtered={c.get('filtered', 0)}"
        )
        if s["state"] == "invalid":
            print(f"      {s['reason']}")
        if s.get("metrics"):
            shown = list(s["metrics"].items())[:8]
            print("      metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in shown)
                  + (f", ... ({len(s['metrics'])} in all)" if len(s["metrics"]) > 8 else ""))
        for k, o in s["outputs"].items():
            print(
                f"      {k}: {o['uri']}"
                + (f"@v{o['version']}" if o.get("version") is not None else "")
            )
    return _report_problems(problems)


def _job_status(args: argparse.Namespace) -> int:
    from pipelines.submit import Jobs, describe_job, exit_code_for

    jobs = Jobs(args.address)
    d = describe_job(jobs.info(args.job))
    if args.json:
        print(json.dumps({"address": jobs.address, **d}, indent=2))
    else:
        print(f"job {args.job} on {jobs.address}: {d['status']}")
        for key in ("message", "entrypoint", "start_time", "end_time", "seconds"):
            if d[key] is not None:
                print(f"  {key + ':':<12} {d[key]}")
        for k, v in d["metadata"].items():
            print(f"  {k + ':':<12} {v}")
    return exit_code_for(d["status"])


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import Jobs, build_submission, exit_code_for

    try:
        plan = build_submission(
            args.dag,
            storage=args.storage,
            tracking_uri=args.tracking_uri,
            code=args.code,
            env=args.env,
            runtime_env_file=args.runtime_env,
            submission_id=args.submission_id,
        )
    except ValueError as e:
        if type(e) is not ValueError:  # DagError: reported by main()
            raise
        print(f"vgen submit: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.dry_run:
            print(json.dumps(plan.to_json(), indent=2))  # env_vars values redacted
            return EXIT_OK
        for note in plan.notes:
            print(f"vgen submit: note: {note}", file=sys.stderr)
        jobs = Jobs(args.address)
        job_id = jobs.submit(plan)
    finally:
        plan.cleanup()
    print(job_id, flush=True)
    print(
        f"submitted job {job_id} to {jobs.address}: {plan.shown_entrypoint()}\n"
        f"  follow: vgen logs {job_id} --address {jobs.address} --follow\n"
        f"  status: vgen status --job {job_id} --address {jobs.address}\n"
        f"  stop:   vgen stop {job_id} --address {jobs.address}",
        file=sys.stderr,
        flush=True,
    )
    if not args.wait:
        return EXIT_OK
    status = jobs.follow(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return exit_code_for(status)


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines.submit import Jobs, exit_code_for

    jobs = Jobs(args.address)
    if args.follow:
        status = jobs.follow(args.job)
        print(f"job {args.job}: {status}", file=sys.stderr)
        return exit_code_for(status)
    sys.stdout.write(jobs.logs(args.job))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from pipelines.submit import Jobs

    jobs = Jobs(args.address)
    if jobs.stop(args.job):
        print(f"job {args.job}: stop requested")
        if args.wait:
            print(f"job {args.job}: {jobs.wait(args.job)}")
    else:
        print(f"job {args.job} had already ended: {jobs.status(args.job)}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from pipelines.dag.gc import gc_dag

    dag, store, _ = _load(args)
    results = gc_dag(dag, store, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for r in results:
        print(
            f"{store.uri(r.table)}: {verb} {r.stale} stale rows (source {r.source}); "
            f"version {r.version}"
        )
    if not results:
        print("no side tables recorded for this DAG yet")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from vgen_core.data import TableStore
    from vgen_core.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(TableStore(args.storage).root)
    from vgen_core.tracking.redact import redact_uri

    from vgen_core.tracking import mlflow_ui_url

    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {redact_uri(uri)} on {base} (Ctrl-C to stop); the experiments in its "
          f"model-training layout: {mlflow_ui_url(base)}")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    # a personal UI over a local store: no background job runner (MLflow's default starts one
    # with several consumer processes, which a laptop or a 2-core head node does not need)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # the server (and the uvicorn workers it spawns) get a process group of their own, stopped
    # as a whole when this command is interrupted or terminated: nothing is left listening
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        return EXIT_OK


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left of it after ``grace`` s
    (the server, or workers that outlived it)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass
    proc.wait()


def cmd_weights(args: argparse.Namespace) -> int:
    """``vgen weights inspect PATH`` / ``vgen weights convert SRC DST``: exit 2 with the reason
    (for convert, the key diff) when the file cannot be read or does not fit; nothing written."""
    from vgen_core.weights import WeightsError, convert, format_report, inspect

    if args.weights_command == "convert":
        overrides: dict[str, Any] = {}
        for item in args.set:
            field_name, eq, value = item.partition("=")
            if not eq or not field_name:
                print(f"vgen: --set {item!r}: expected FIELD=VALUE", file=sys.stderr)
                return EXIT_USAGE
            try:
                overrides[field_name] = json.loads(value)
            except ValueError:
                overrides[field_name] = value  # a bare string
        try:
            manifest = convert(args.src, args.dst, args.family, args.size, overrides=overrides,
                               pixel_range=args.pixel_range, force=args.force)
        except WeightsError as e:
            print(f"vgen: {e}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps(manifest, indent=2, sort_keys=True))
        else:
            dropped = manifest["dropped"]
            print(f"{args.dst}: {manifest['family']} / {manifest['size']}, "
                  f"{manifest['tensors']} tensors, pixel range {manifest['pixel_range']}, "
                  f"from {manifest['source']['names']} names"
                  + (f"; {len(dropped)} released tensors not loaded:" if dropped else ""))
            for key, reason in sorted(dropped.items())[:10]:
                print(f"  {key}: {reason}")
        return EXIT_OK
    try:
        report = inspect(args.path)
    except WeightsError as e:
        print(f"vgen: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _cmd_tracking(args: argparse.Namespace) -> int:
    from pipelines.tracking_cli import cmd_tracking

    return cmd_tracking(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from pipelines.report import cmd_report

    return cmd_report(args)


def main(argv: list[str] | None = None) -> int:
    from pipelines.dag.spec import DagError
    from pipelines.submit import ClusterError
    from vgen_core.data import StorageError

    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "plan": cmd_plan,
        "status": cmd_status,
        "gc": cmd_gc,
        "ui": cmd_ui,
        "submit": cmd_submit,
        "logs": cmd_logs,
        "stop": cmd_stop,
        "report": _cmd_report,
        "tracking": _cmd_tracking,
        "families": cmd_families,
        "weights": cmd_weights,
    }[args.command]
    try:
        return handler(args)
    except DagError as e:
        for line in str(e).splitlines() or [""]:  # ConfigErrors: one line per problem
            print(f"vgen: invalid DAG: {line}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as e:
        print(f"vgen: storage error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterError as e:
        print(f"vgen: cluster error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command not in ("submit", "logs"):
            raise
        print(
            "vgen: stopped following; the job keeps running on the cluster (vgen stop ID to "
            "stop it)",
            file=sys.stderr,
        )
        return 130


def entry() -> None:
    """The ``vgen`` command: :func:`main`, then the process ends without Python's finalization.

    Everything is done when ``main`` returns (Ray stopped, the tracking process waited for, the
    log written); what is left is the interpreter tearing down torch, pyarrow and deltalake
    module by module: 0.6 s measured on 2 cores, a tenth of a small re-run. Streams and logging
    handlers are flushed first. ``main`` itself returns normally (tests, embedding)."""
    import logging

    code = int(main() or 0)
    try:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:
        sys.exit(code)  # a stream that cannot be flushed: let Python report it
    os._exit(code)


if __name__ == "__main__":
    entry()
