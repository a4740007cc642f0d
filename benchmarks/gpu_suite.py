"""One GPU benchmark run for issue #17: every benchmark under a time cap, one table of every ratio
against the issue's goals.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/gpu_suite.py            # on one GPU, < 8 min
    .venv/bin/python benchmarks/gpu_suite.py --device cpu --quick              # CPU smoke run
    ... [--only lfq,grat] [--cap grat=120] [--budget 470] [--json table.json] [--keep DIR]

Runs, in this order, each as a child process with its own time cap (``ENTRIES``; ``--cap``
overrides one), all inside ``--budget`` seconds (a cap never runs past what is left of it):

* ``lfq``, ``ternary``, ``grat``, ``grat-presets``: benchmarks/kernels/bench_*.py ``--json``
  (``grat-presets``: the paper's Flux 8192² and HunyuanVideo settings, forward);
* ``mfu``: benchmarks/generator_mfu.py, eager and compiled when it has ``--modes`` (its stdout is
  parsed: the file is another benchmark's);
* ``tokenizer-forward``: benchmarks/tokenizer_forward.py ``--compile --json``;
* ``tokenize``: benchmarks/tokenize_throughput.py ``--device cuda --json`` (the stage on its Ray
  executor);
* ``train-overhead``: benchmarks/train_overhead.py ``--device cuda --without-ray``: the DeepSpeed
  loop against the plain loop, the issue's ratio (stdout parsed).

The table has one row per figure: what, the figure, the goal of issue #17, met (yes / no; "n/a"
for figures without a goal; "needs CUDA" for GPU goals on a machine without one) and where it
came from. Entries that fail or time out get a row saying so, with the end of their output; what
they finished before a time-out still counts (the benchmarks write their JSON as they go where a
run is long). ``--device cpu --quick`` runs every entry at a tiny size (kernels in the Triton
interpreter or their CPU paths) in a few minutes: it checks the suite end to end, not the speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# --------------------------------------------------------------------------------------------------
# goals of issue #17 and the table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """``figure >= value`` (or ``>`` when ``strict``), shown as ``text``."""

    value: float
    text: str
    strict: bool = False

    def met(self, figure: float) -> bool:
        return figure > self.value if self.strict else figure >= self.value


@dataclass
class Row:
    area: str
    what: str
    figure: float | None
    unit: str = ""
    goal: Goal | None = None
    source: str = ""
    note: str = ""
    status: str = ""  # overrides "met": "needs CUDA", "timeout", "error", ...

    @property
    def met(self) -> str:
        if self.status:
            return self.status
        if self.goal is None or self.figure is None:
            return "n/a"
        return "yes" if self.goal.met(self.figure) else "no"


#: LFQ: fraction of HBM peak at B=1024, N=1024, K=12 fp32
LFQ_GOALS = {"fwd": Goal(0.7, ">= 0.7"), "fwd+bwd": Goal(0.5, ">= 0.5")}
LFQ_HEADLINE = (1024, 1024, 12, "fp32")
#: ternary linear: speed-up over bf16 by batch M
TERNARY_GOALS = {1: Goal(4.0, ">= 4x"), 16: Goal(2.0, ">= 2x"), 4096: Goal(0.8, ">= 0.8x")}
#: generators' train-step MFU at batch 256 (bf16), by family:size
MFU_GOALS = {"maskgit:B": Goal(0.45, ">= 0.45"), "rar:B": Goal(0.45, ">= 0.45"),
             "deepflow:B/2": Goal(0.65, ">= 0.65")}
TOKENIZE_GOAL = Goal(0.9, ">= 0.9")
TRAIN_OVERHEAD_GOAL = Goal(0.95, ">= 0.95")
FASTER = Goal(1.0, "> 1x", strict=True)


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "x":
        return f"{x:.2f}x"
    if unit in ("of peak", "MFU", "ratio"):
        return f"{x:.3f}"
    if unit in ("img/s", "enc/s"):
        return f"{x:,.0f} {unit}"
    return f"{x:.3g} {unit}".strip()


def build_table(rows: list[Row]) -> str:
    """The one table: area | what | figure | goal | met | source (notes below it)."""
    head = ["area", "what", "figure", "goal", "met", "source"]
    body = [[r.area, r.what, _fmt(r.figure, r.unit), r.goal.text if r.goal else "-", r.met,
             r.source] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    notes = [f"- {r.area} / {r.what}: {r.note}" for r in rows if r.note]
    met = [r.met for r in rows if r.goal is not None]
    out.append(f"\ngoals met: {met.count('yes')} of {len(met)} "
               f"({met.count('no')} not met, {len(met) - met.count('yes') - met.count('no')} "
               "not measured)")
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


# --------------------------------------------------------------------------------------------------
# parsing each benchmark's output (pure functions: tests/unit/test_gpu_suite.py)
# --------------------------------------------------------------------------------------------------


def _cuda(data: dict) -> bool:
    return str(data.get("device", "cpu")).lower() not in ("cpu", "")


def rows_lfq(data: dict) -> list[Row]:
    rows = []
    if not _cuda(data):
        return [Row("LFQ", f"{op}, B=1024 N=1024 K=12 fp32, fraction of HBM peak", None,
                    "of peak", goal, "bench_lfq", status="needs CUDA")
                for op, goal in LFQ_GOALS.items()]
    for r in data.get("rows", []):
        if r["op"] not in LFQ_GOALS:
            continue
        head = (r["B"], r["N"], r["K"], r["dtype"]) == LFQ_HEADLINE
        rows.append(Row("LFQ", f"{r['op']}, B={r['B']} N={r['N']} K={r['K']} {r['dtype']}, "
                        "fraction of HBM peak", r.get("peak_frac"), "of peak",
                        LFQ_GOALS[r["op"]] if head else None, "bench_lfq",
                        note="" if r.get("peak_frac") is not None else
                        "peak bandwidth unknown for this device: pass --peak-tbs"))
    return rows


def rows_grat(data: dict, source: str = "bench_grat") -> list[Row]:
    dens = {d["setting"]: d["density"] for d in data.get("densities", [])}
    rows = []
    if not _cuda(data):
        for name, d in dens.items():
            rows.append(Row("GRAT", f"{name}: density (FLOP bound 1/density = {1 / d:.1f}x)", d,
                            "ratio", None, source))
            rows.append(Row("GRAT", f"{name} fwd vs dense SDPA", None, "x",
                            Goal(0.8 / d, f">= {0.8 / d:.2f}x (0.8/density)"), source,
                            status="needs CUDA"))
        return rows
    for r in data.get("rows", []):
        d = r.get("density") or dens.get(r["setting"])
        name = f"{r['setting']} (L={r['L']:,}, density {d:.3f}) {r['pass']}"
        dense_goal = (Goal(0.8 / d, f">= {0.8 / d:.2f}x (0.8/density)") if r["pass"] == "fwd"
                      else FASTER)
        rows.append(Row("GRAT", f"{name} vs dense SDPA", r["x_dense"], "x", dense_goal, source))
        if r.get("x_flex") is not None:
            rows.append(Row("GRAT", f"{name} vs FlexAttention", r["x_flex"], "x", FASTER,
                            source))
    return rows


def rows_ternary(data: dict) -> list[Row]:
    if not _cuda(data):
        return [Row("ternary", f"M={m}, 3072x3072 vs bf16", None, "x", g, "bench_ternary",
                    status="needs CUDA") for m, g in TERNARY_GOALS.items()]
    return [Row("ternary", f"M={r['M']}, {r['N']}x{r['K']} vs bf16 F.linear", r["speedup"], "x",
                TERNARY_GOALS.get(r["M"]), "bench_ternary") for r in data.get("rows", [])]


_MFU_LINE = re.compile(r"^(?P<model>\S+:\S+)\s+(?:(?P<mode>eager|compiled)\s+)?.*?"
                       r"MFU\s+(?P<mfu>[0-9.]+)")


def rows_mfu(stdout: str, cuda: bool) -> list[Row]:
    """generator_mfu.py's lines ``<family:size> [eager|compiled] ... MFU 0.123 ...``; the goal
    applies to the compiled step where there is one (the train stage's ``compile: true``)."""
    found = [(m["model"], m["mode"] or "eager", float(m["mfu"]), re.search(r"batch (\d+)",
                                                                           m.string))
             for m in map(_MFU_LINE.match, stdout.splitlines()) if m]
    compiled = {model for model, mode, _, _ in found if mode == "compiled"}
    rows = []
    for model, mode, mfu, batch in found:
        goal = MFU_GOALS.get(model) if (mode == "compiled" or model not in compiled) else None
        what = (f"{model} {mode}, batch {batch[1] if batch else '?'} "
                f"{'bf16' if cuda else 'fp32 (cpu)'}")
        rows.append(Row("train MFU", what, mfu, "MFU", goal, "generator_mfu",
                        status="" if cuda or goal is None else "needs CUDA"))
    return rows


def rows_tokenizer_forward(data: dict) -> list[Row]:
    return [Row("tokenizer encode", f"{r['spec']} {r['mode']} {r['precision']}, batch "
                f"{r['batch']}", r["images_per_s"], "img/s", None, "tokenizer_forward")
            for r in data.get("rows", [])]


def rows_tokenize(data: dict, forward: dict | None = None) -> list[Row]:
    """Per tokenizer: stage / encode-alone (goal >= 0.9), images/s per GPU, and, with
    tokenizer_forward's figures, the stage's encodes/s against the compiled encode's."""
    cuda = data.get("device") == "cuda"
    compiled = {r["spec"].rsplit(":", 1)[0]: r["images_per_s"] for r in (forward or {})
                .get("rows", []) if r["mode"] == "compiled"}
    rows = []
    for r in data.get("results", []):
        name = (f"{r['kind']} {r['size']} ({r['precision']}"
                f"{', compiled' if r.get('compile') else ''}, {r['executor']} executor)")
        ratio = r.get("stage_over_forward")
        rows.append(Row("tokenize stage", f"{name}: stage / encode alone", ratio, "ratio",
                        TOKENIZE_GOAL, "tokenize_throughput",
                        status="" if cuda else "n/a: cpu",
                        note="in-process executor (no Ray): a lower bound"
                        if r["executor"] != "ray" else ""))
        rows.append(Row("tokenize stage", f"{name}: images/s per {'GPU' if cuda else 'CPU'}",
                        r["stage_rows_s"], "img/s", None, "tokenize_throughput"))
        key = f"{r['family']}:{r['size']}"
        if key in compiled:
            enc = r["stage_rows_s"] * r.get("views", 1)
            rows.append(Row("tokenize stage", f"{name}: stage encodes/s / compiled encode",
                            enc / compiled[key], "ratio", TOKENIZE_GOAL,
                            "tokenize_throughput + tokenizer_forward",
                            note=f"{key}: stage batches of {r['batch_size']} rows x "
                            f"{r.get('views', 1)} views, tokenizer_forward batch as it ran"
                            + ("" if r.get("compile") else "; the stage ran eager (suite "
                               "budget): tokenize_throughput.py --compile for the compiled "
                               "stage")))
    return rows


_OVERHEAD_LINE = re.compile(r"^(?P<name>plain PyTorch loop|train stage, 1 worker|"
                            r"DeepSpeed loop, no Ray)\s+(?P<nums>.*)$")


def rows_train_overhead(stdout: str, cuda: bool) -> list[Row]:
    """train_overhead.py's table: ``<name>  median best  ratio-median ratio-best [...]``; the
    best-window ratio counts (its docstring: the fair comparison on a shared machine)."""
    rows = []
    for line in stdout.splitlines():
        m = _OVERHEAD_LINE.match(line.strip())
        if not m or m["name"] == "plain PyTorch loop":
            continue
        nums = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", m["nums"])]
        if len(nums) < 4:
            continue
        goal = TRAIN_OVERHEAD_GOAL if m["name"].startswith("DeepSpeed") else None
        rows.append(Row("train loop", f"{m['name']} / plain loop (best window)", nums[3],
                        "ratio", goal, "train_overhead",
                        status="" if cuda or goal is None else "n/a: cpu"))
    return rows


# --------------------------------------------------------------------------------------------------
# running the entries
# --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    script: str
    args: list[str]
    cap_s: float
    json: bool = True  # the script takes --json PATH
    env: dict[str, str] = field(default_factory=dict)


def gpu_entries() -> list[Entry]:
    """The GPU plan. Caps are estimates for one H100/H200 (sum 465 s); ``--cap`` adjusts one."""
    return [
        Entry("lfq", "kernels/bench_lfq.py", ["--iters", "30"], 20),
        Entry("ternary", "kernels/bench_ternary.py", [], 20),
        Entry("grat", "kernels/bench_grat.py", ["--only", "video"], 70),
        Entry("grat-presets", "kernels/bench_grat.py",
              ["--preset", "flux8k,hunyuan", "--passes", "fwd"], 45),
        Entry("mfu", "generator_mfu.py", ["--models", "maskgit:B", "rar:B", "deepflow:B/2",
                                          "--batch", "256", "--modes", "eager", "compiled",
                                          "--steps", "10", "--windows", "2", "--warmup", "3"],
              80, json=False),
        Entry("tokenizer-forward", "tokenizer_forward.py",
              ["--specs", "lfq:maskbit-k12:256", "titok:titok-bl64-vq:256",
               "kl_vae:sd-vae-f8c4:256", "--batch", "64", "--iters", "10", "--compile",
               "--nchw"], 60),
        Entry("tokenize", "tokenize_throughput.py", ["--device", "cuda", "--n", "2048",
                                                     "--chunk-size", "64", "--repeats", "1"],
              110),
        Entry("train-overhead", "train_overhead.py", ["--device", "cuda", "--size", "B",
                                                      "--batch", "256", "--steps", "30",
                                                      "--window", "10", "--without-ray",
                                                      "--peak-tflops", "989"],
              60, json=False),
    ]


def quick_cpu_entries() -> list[Entry]:
    return [
        Entry("lfq", "kernels/bench_lfq.py", ["--iters", "3"], 60,
              env={"TRITON_INTERPRET": "1"}),
        Entry("ternary", "kernels/bench_ternary.py", ["--shapes", "256x256"], 60),
        Entry("grat", "kernels/bench_grat.py", ["--only", "video-32k", "--iters", "2"], 60),
        Entry("grat-presets", "kernels/bench_grat.py",
              ["--preset", "flux8k,hunyuan", "--iters", "2"], 60),
        Entry("mfu", "generator_mfu.py", ["--device", "cpu", "--models", "maskgit:tiny",
                                          "--batch", "8", "--modes", "eager", "--steps", "2",
                                          "--windows", "1", "--warmup", "1",
                                          "--peak-tflops", "1"], 90, json=False),
        Entry("tokenizer-forward", "tokenizer_forward.py",
              ["--device", "cpu", "--specs", "lfq:tiny:32", "titok:tiny:32", "kl_vae:tiny:16",
               "--batch", "4", "--iters", "2"], 60),
        Entry("tokenize", "tokenize_throughput.py", ["--device", "cpu", "--kind", "tokenize.lfq",
                                                     "--n", "256", "--chunk-size", "16",
                                                     "--repeats", "1"], 150),
        Entry("train-overhead", "train_overhead.py", ["--size", "tiny", "--steps", "10",
                                                      "--window", "5", "--without-ray"],
              90, json=False),
    ]


@dataclass
class Outcome:
    entry: Entry
    rc: int | None  # None: timed out
    seconds: float
    stdout: str
    json: dict | None


def supported_flags(script: Path, flags: list[str]) -> set[str]:
    """The ``--flags`` of ``flags`` that ``script --help`` lists (another engineer's benchmark
    may not have them yet)."""
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT).stdout
    except subprocess.TimeoutExpired:
        return set()
    return {f for f in flags if f in out}


def drop_flag(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag`` and the values after it (up to the next ``--option``)."""
    out, skipping = [], False
    for a in args:
        if a == flag:
            skipping = True
            continue
        if skipping and a.startswith("--"):
            skipping = False
        if not skipping:
            out.append(a)
    return out


def run_entry(entry: Entry, cap: float, workdir: Path) -> Outcome:
    """Run one benchmark in its own process group; past ``cap`` seconds the group is ended (what
    its JSON holds by then is kept)."""
    script = BENCH / entry.script
    args = list(entry.args)
    if entry.name == "mfu" and "--modes" in args and not supported_flags(script, ["--modes"]):
        args = drop_flag(args, "--modes")  # an older generator_mfu: eager only
    json_path = workdir / f"{entry.name}.json"
    if entry.json:
        args += ["--json", str(json_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **entry.env)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(cap, 1.0))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the benchmark's own group (Ray workers included)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        out, _ = proc.communicate()
        rc = None
    data = None
    if entry.json and json_path.exists():
        try:
            data = json.loads(json_path.read_text())
        except ValueError:
            data = None
    (workdir / f"{entry.name}.log").write_text(out or "")
    return Outcome(entry, rc, time.perf_counter() - t0, out or "", data)


def rows_for(outcome: Outcome, cuda: bool, done: dict[str, Outcome]) -> list[Row]:
    """The table rows of one finished entry (parse errors become a row, never a crash)."""
    e, data, out = outcome.entry, outcome.json, outcome.stdout
    parsers: dict[str, Callable[[], list[Row]]] = {
        "lfq": lambda: rows_lfq(data or {}),
        "ternary": lambda: rows_ternary(data or {}),
        "grat": lambda: rows_grat(data or {}),
        "grat-presets": lambda: rows_grat(data or {}, "bench_grat --preset"),
        "mfu": lambda: rows_mfu(out, cuda),
        "tokenizer-forward": lambda: rows_tokenizer_forward(data or {}),
        "tokenize": lambda: rows_tokenize(data or {}, (done.get("tokenizer-forward").json
                                                        if "tokenizer-forward" in done else None)),
        "train-overhead": lambda: rows_train_overhead(out, cuda),
    }
    try:
        rows = parsers[e.name]()
    except Exception as exc:  # a changed output format: say so in the table
        rows = [Row(e.name, f"could not parse the output ({type(exc).__name__}: {exc})", None,
                    source=e.script, status="error")]
    tail = " / ".join(line.strip() for line in out.strip().splitlines()[-3:])[-300:]
    if outcome.rc is None:
        rows.append(Row(e.name, f"timed out after {outcome.seconds:.0f} s (cap)", None,
                        source=e.script, status="timeout",
                        note=f"rows above are what finished; last output: {tail}"))
    elif outcome.rc != 0:
        rows.append(Row(e.name, f"exit code {outcome.rc}", None, source=e.script,
                        status="error", note=f"last output: {tail}"))
    elif not rows:
        rows.append(Row(e.name, "no figures in the output", None, source=e.script,
                        status="error", note=f"last output: {tail}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when torch sees a GPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke run)")
    ap.add_argument("--only", default=None, help="comma-separated entry names")
    ap.add_argument("--cap", action="append", default=[], metavar="NAME=SECONDS",
                    help="time cap of one entry")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for the whole suite (default 470: under 8 minutes)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the table rows as JSON")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="keep each entry's log and JSON in DIR (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    entries = quick_cpu_entries() if (args.quick or not cuda) else gpu_entries()
    if not cuda and not args.quick:
        print("no --quick on cpu: running the CPU smoke sizes anyway (the GPU sizes need one)")
    caps = {k: float(v) for k, v in (c.split("=", 1) for c in args.cap)}
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e.name in wanted]
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="vgen-gpu-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    done: dict[str, Outcome] = {}
    rows: list[Row] = []
    print(f"gpu_suite on {args.device}: {', '.join(e.name for e in entries)}; budget "
          f"{args.budget:.0f} s; logs in {workdir}", flush=True)
    for e in entries:
        left = deadline - time.perf_counter()
        cap = min(caps.get(e.name, e.cap_s), left)
        if cap < 5:
            rows.append(Row(e.name, "not run: the suite's budget is spent", None,
                            source=e.script, status="skipped"))
            continue
        outcome = run_entry(e, cap, workdir)
        done[e.name] = outcome
        state = "timeout" if outcome.rc is None else f"rc {outcome.rc}"
        print(f"  {e.name:<18} {outcome.seconds:6.1f} s  {state}", flush=True)
        rows += rows_for(outcome, cuda, done)
    total = args.budget - (deadline - time.perf_counter())
    print(f"\nissue #17 figures, {args.device}"
          f"{' (quick: smoke sizes, not comparable)' if args.quick or not cuda else ''}, "
          f"{total:.0f} s\n")
    print(build_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{**r.__dict__, "goal": r.goal.text if r.goal
                                                else None, "met": r.met} for r in rows],
                                              indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
