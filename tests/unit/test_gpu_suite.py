"""benchmarks/gpu_suite.py without running a benchmark: canned JSON and stdout of each one become
the table's rows with the issue #17 goals, and the table marks each goal met or not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks/gpu_suite.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


LFQ_GPU = {"benchmark": "bench_lfq", "device": "NVIDIA H200", "peak_Bps": 4.8e12, "rows": [
    {"op": "fwd", "B": 16, "N": 256, "K": 12, "dtype": "fp32", "peak_frac": 0.02},
    {"op": "fwd", "B": 1024, "N": 1024, "K": 12, "dtype": "fp32", "peak_frac": 0.71},
    {"op": "fwd+bwd", "B": 1024, "N": 1024, "K": 12, "dtype": "fp32", "peak_frac": 0.16},
    {"op": "unpack", "B": 1024, "N": 1024, "K": 12, "dtype": "fp32", "peak_frac": 0.5},
]}


def test_lfq_rows_carry_the_goals_of_the_headline_size_only(suite):
    rows = suite.rows_lfq(LFQ_GPU)
    assert [(r.what.split(",")[0], r.figure, r.met) for r in rows] == [
        ("fwd", 0.02, "n/a"), ("fwd", 0.71, "yes"), ("fwd+bwd", 0.16, "no")]
    assert rows[1].goal.text == ">= 0.7" and rows[2].goal.text == ">= 0.5"
    cpu = suite.rows_lfq({"device": "cpu", "rows": [{"op": "fwd", "B": 2}]})
    assert [r.met for r in cpu] == ["needs CUDA", "needs CUDA"]


def test_grat_rows_goal_is_0_8_over_density_forward_and_faster_backward(suite):
    data = {"device": "NVIDIA H100 80GB HBM3", "densities": [
        {"setting": "video-123k-X", "density": 0.345}], "rows": [
        {"setting": "video-123k-X", "L": 123136, "density": 0.345, "pass": "fwd",
         "x_dense": 1.72, "x_flex": 0.95},
        {"setting": "video-123k-X", "L": 123136, "density": 0.345, "pass": "fwd+bwd",
         "x_dense": 0.98, "x_flex": None}]}
    rows = suite.rows_grat(data)
    assert [(r.figure, r.goal.text, r.met) for r in rows] == [
        (1.72, ">= 2.32x (0.8/density)", "no"),  # 0.8 / 0.345 = 2.319
        (0.95, "> 1x", "no"),
        (0.98, "> 1x", "no")]
    assert rows[0].goal.value == pytest.approx(0.8 / 0.345)
    fast = suite.rows_grat({**data, "rows": [{**data["rows"][0], "x_dense": 2.4,
                                              "x_flex": 1.1}]})
    assert [r.met for r in fast] == ["yes", "yes"]
    cpu = suite.rows_grat({"device": "cpu", "densities": [{"setting": "flux8k-B-r1",
                                                           "density": 0.0106}], "rows": []})
    assert [r.met for r in cpu] == ["n/a", "needs CUDA"]
    assert "94.3x" in cpu[0].what  # the FLOP bound 1 / density


def test_ternary_goals_by_batch(suite):
    rows = suite.rows_ternary({"device": "H200", "rows": [
        {"M": 1, "N": 3072, "K": 3072, "speedup": 4.5},
        {"M": 16, "N": 3072, "K": 3072, "speedup": 0.27},
        {"M": 4096, "N": 3072, "K": 3072, "speedup": 0.8},
        {"M": 64, "N": 3072, "K": 3072, "speedup": 1.0}]})
    assert [(r.goal.text if r.goal else None, r.met) for r in rows] == [
        (">= 4x", "yes"), (">= 2x", "no"), (">= 0.8x", "yes"), (None, "n/a")]


MFU_OUT = """device: NVIDIA H200; batch 256, best of 2 windows of 10 steps after 3; peak 989 TFLOP/s
maskgit:B        eager     params   172.0M  batch 256 x 256 tokens     3.10 steps/s  ... 240.000 TFLOP/s  MFU 0.243  first step 1.2s  loss 7.1
maskgit:B        compiled  params   172.0M  batch 256 x 256 tokens     4.00 steps/s  ... 450.000 TFLOP/s  MFU 0.455  first step 30.2s  loss 7.1
deepflow:B/2     eager     params   130.0M  batch 256 x 256 tokens     5.00 steps/s  ... 385.000 TFLOP/s  MFU 0.390  first step 1.0s  loss 1.2
maskgit:B        compiled / eager  1.87x
"""


def test_mfu_stdout_goal_on_the_compiled_step_or_the_only_one(suite):
    rows = suite.rows_mfu(MFU_OUT, cuda=True)
    assert [(r.what.split(",")[0], r.figure, r.met) for r in rows] == [
        ("maskgit:B eager", 0.243, "n/a"),
        ("maskgit:B compiled", 0.455, "yes"),
        ("deepflow:B/2 eager", 0.39, "no")]  # no compiled line: the eager one carries the goal
    old = "maskgit:B      params  172.0M  batch 256 x 256 tokens  MFU 0.240  peak mem 20 GiB\n"
    (row,) = suite.rows_mfu(old, cuda=True)  # the format before the modes existed
    assert (row.what, row.figure, row.met) == ("maskgit:B eager, batch 256 bf16", 0.24, "no")
    assert suite.rows_mfu(MFU_OUT, cuda=False)[1].met == "needs CUDA"


def test_tokenize_rows_and_the_cross_ratio_against_the_compiled_encode(suite):
    tput = {"device": "cuda", "results": [
        {"kind": "tokenize.lfq", "size": "maskbit-k12", "family": "lfq", "precision": "bf16",
         "executor": "ray", "views": 2, "batch_size": 256, "stage_rows_s": 950.0,
         "forward_rows_s": 1000.0, "stage_over_forward": 0.95}]}
    fwd = {"rows": [{"spec": "lfq:maskbit-k12:256", "mode": "eager", "images_per_s": 1500.0},
                    {"spec": "lfq:maskbit-k12:256", "mode": "compiled", "images_per_s": 2000.0}]}
    rows = suite.rows_tokenize(tput, fwd)
    assert [(r.figure, r.met) for r in rows] == [(0.95, "yes"), (950.0, "n/a"), (0.95, "yes")]
    assert rows[2].figure == pytest.approx(950 * 2 / 2000)
    slow = suite.rows_tokenize({**tput, "results": [{**tput["results"][0],
                                                     "stage_over_forward": 0.6,
                                                     "executor": "in-process"}]})
    assert [r.met for r in slow] == ["no", "n/a"] and "lower bound" in slow[0].note
    cpu = suite.rows_tokenize({**tput, "device": "cpu"})
    assert cpu[0].met == "n/a: cpu"


TRAIN_OUT = """MaskGIT B (172.00M params), batch 256 x 256 tokens, 1 thread(s), cuda, ZeRO-2, 2 windows
                             median      best  steps/s   stage/plain: median  best
plain PyTorch loop            3.100     3.200                   1.000 1.000  MFU(best) 24.0%
train stage, 1 worker         2.800     2.900                   0.903 0.906  MFU(best) 21.8%  peak GPU memory 30.10 GiB
DeepSpeed loop, no Ray        2.950     3.050                   0.952 0.953  MFU(best) 22.9%
"""


def test_train_overhead_best_window_ratio(suite):
    rows = suite.rows_train_overhead(TRAIN_OUT, cuda=True)
    assert [(r.what, r.figure, r.met) for r in rows] == [
        ("train stage, 1 worker / plain loop (best window)", 0.906, "n/a"),
        ("DeepSpeed loop, no Ray / plain loop (best window)", 0.953, "yes")]
    assert suite.rows_train_overhead(TRAIN_OUT, cuda=False)[1].met == "n/a: cpu"


def test_table_and_failed_or_timed_out_entries(suite, tmp_path):
    e = suite.Entry("train-overhead", "train_overhead.py", [], 10, json=False)
    timeout = suite.Outcome(e, None, 40.2, TRAIN_OUT + "killed\n", None)
    rows = suite.rows_for(timeout, True, {})
    assert [r.met for r in rows] == ["n/a", "yes", "timeout"]
    assert "timed out after 40 s" in rows[-1].what and "killed" in rows[-1].note
    broken = suite.Outcome(suite.Entry("grat", "kernels/bench_grat.py", [], 10), 1,
                           3.0, "Traceback\nRuntimeError: CUDA error", {"device": "H100",
                                                                         "rows": [{}]})
    (row,) = [r for r in suite.rows_for(broken, True, {}) if r.status == "error"][:1]
    assert row.what.startswith("could not parse")
    table = suite.build_table(suite.rows_lfq(LFQ_GPU) + rows)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["area", "what", "figure", "goal",
                                                              "met", "source"]
    body = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:7]]
    assert body[1][2:5] == ["0.710", ">= 0.7", "yes"] and body[2][2:5] == ["0.160", ">= 0.5", "no"]
    assert "goals met: 2 of 3 (1 not met, 0 not measured)" in table
    assert "timed out" in table and "notes:" in table


def test_drop_flag_and_the_entry_lists(suite):
    assert suite.drop_flag(["--models", "a", "--modes", "eager", "compiled", "--batch", "8"],
                           "--modes") == ["--models", "a", "--batch", "8"]
    names = [e.name for e in suite.gpu_entries()]
    assert names == [e.name for e in suite.quick_cpu_entries()] == [
        "lfq", "ternary", "grat", "grat-presets", "mfu", "tokenizer-forward", "tokenize",
        "train-overhead"]
    assert sum(e.cap_s for e in suite.gpu_entries()) <= 470  # under 8 minutes with start-up
    for e in suite.gpu_entries() + suite.quick_cpu_entries():
        assert (ROOT / "benchmarks" / e.script).exists(), e.script
