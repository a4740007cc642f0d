"""Resume arithmetic: which steps checkpoint, run and log after a restore; the worker state
files; and (in a subprocess with a one-rank gloo group) that a DeepSpeed run stopped at a
checkpoint and resumed through the verified, weights-only restore ends with exactly the weights
of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vgen_core.training import TrainConfig, WorkerState, checkpoint_due, train_loop
from vgen_core.training.checkpoint import (
    load_worker_state,
    log_floor,
    restore_rng,
    rng_tensors,
    save_worker_state,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("every,total,due", [
    (10, 25, [10, 20, 25]),
    (5, 15, [5, 10, 15]),
    (0, 25, []),
    (100, 60, [60]),
], ids=["every10-of25", "every5-of15", "off", "every100-of60"])
def test_checkpoint_steps(every, total, due):
    assert [s for s in range(1, total + 1) if checkpoint_due(s, every, total)] == due


def test_log_floor_covers_steps_logged_after_the_checkpoint():
    assert log_floor(0, None) == 0
    assert log_floor(20, None) == 20
    assert log_floor(20, 27) == 27  # the crashed attempt logged 21..27 already
    assert log_floor(20, 12) == 20


class _FakeEngine:
    """DeepSpeed's surface the loop uses: an optimizer step every ``accum`` micro-steps."""

    def __init__(self, accum: int):
        self.module = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.accum, self.micro, self.optimizer_steps = accum, 0, 0

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.optimizer_steps += 1


def _loss(module, batch, step):
    return module(batch["x"]).pow(2).mean(), {"seen_step": torch.tensor(float(step))}


def _run(start: int, steps: int = 23, accum: int = 2, log_every: int = 5):
    cfg = TrainConfig(steps=steps, grad_accum=accum, log_every=log_every, micro_batch_size=4,
                      warmup_steps=3)
    engine = _FakeEngine(accum)
    consumed, logged, stepped, lrs = [], [], [], []

    def batches():
        i = 0
        while True:
            consumed.append(i)
            i += 1
            yield {"x": torch.ones(4, 2)}

    def on_step(step, last):
        stepped.append(step)
        lrs.append(engine.optimizer.param_groups[0]["lr"])

    last = train_loop(engine, batches(), _loss, cfg, on_log=lambda s, m: logged.append((s, m)),
                      on_step=on_step, start_step=start, world_size=3, tokens_per_sample=7)
    return engine, consumed, logged, stepped, lrs, last, cfg


@pytest.mark.parametrize("start", [0, 10, 12, 22], ids=lambda s: f"from{s}")
def test_resumed_loop_runs_and_logs_only_the_remaining_steps(start):
    engine, consumed, logged, stepped, lrs, last, cfg = _run(start)
    assert engine.optimizer_steps == cfg.steps - start
    assert len(consumed) == (cfg.steps - start) * cfg.grad_accum
    assert stepped == list(range(start + 1, cfg.steps + 1))
    want = [s for s in range(start + 1, cfg.steps + 1) if s % cfg.log_every == 0 or s == cfg.steps]
    assert [s for s, _ in logged] == want
    assert last == logged[-1][1]
    # the loss of step s runs with step s's schedule, resumed or not
    assert [m["seen_step"] for s, m in logged] == [float(s - 1) for s in want]


def test_lr_schedule_is_the_same_after_a_resume():
    *_, lrs_full, _, _ = _run(0)
    *_, lrs_tail, _, _ = _run(12)
    assert lrs_tail == lrs_full[12:]


def test_throughput_metrics():
    *_, logged, _, _, last, cfg = _run(0)
    assert last["samples_per_second"] == pytest.approx(
        last["steps_per_second"] * cfg.micro_batch_size * cfg.grad_accum * 3)
    assert last["tokens_per_second"] == pytest.approx(last["samples_per_second"] * 7)
    assert "gpu_mem_max_gb" not in last  # CPU


def test_nothing_left_to_run():
    engine, consumed, logged, stepped, _, last, cfg = _run(23)
    assert (engine.optimizer_steps, consumed, logged, stepped, last) == (0, [], [], [], {})


def test_worker_state_round_trip(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    rng.random(5)
    torch.manual_seed(11)
    torch.rand(3)
    state = WorkerState(step=40, epoch=2, batch=3, restores=1, last_metrics={"loss": 0.5},
                        numpy_rng=rng.bit_generator.state)
    save_worker_state(str(tmp_path), 1, state, {**rng_tensors(), "ema.w": torch.ones(2)})
    expect_torch, expect_np = torch.rand(4), rng.random(4)

    torch.manual_seed(0)
    got, tensors = load_worker_state(str(tmp_path), 1)
    assert got == state
    restore_rng(tensors)
    other = np.random.default_rng(0)
    other.bit_generator.state = got.numpy_rng
    assert torch.equal(torch.rand(4), expect_torch)
    assert np.array_equal(other.random(4), expect_np)
    assert torch.equal(tensors["ema.w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="resources.workers"):
        load_worker_state(str(tmp_path), 0)


_EQUIVALENCE = r"""
import os, sys, tempfile
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import torch, deepspeed
from vgen_core.training import EMA, TrainConfig, deepspeed_config, train_loop
from vgen_core.training.checkpoint import (WorkerState, restore_checkpoint, restore_rng,
                                           rng_tensors, save_checkpoint)

deepspeed.init_distributed(dist_backend="gloo")
cfg = TrainConfig(steps=12, micro_batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2,
                  zero_stage=2, log_every=3)
g = torch.Generator().manual_seed(0)
data = [{"x": torch.randn(4, 6, generator=g)} for _ in range(cfg.steps * cfg.grad_accum)]

def loss_fn(module, batch, step):  # dropout: the torch RNG must be restored too
    return torch.nn.functional.dropout(module(batch["x"]), 0.3).pow(2).mean(), {}

def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    e, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                 config=deepspeed_config(cfg, torch.device("cpu")),
                                 dist_init_required=False)
    return e, EMA(dict(e.module.named_parameters()), 0.9)

def run(e, ema, start, stop_at=None, save_to=None):
    state = WorkerState(step=start)
    def on_step(step, last):
        ema.update(dict(e.module.named_parameters()))
        state.step = step
        if step == stop_at:
            save_checkpoint(e, save_to, 0, state, {**rng_tensors(),
                            **{f"ema.{k}": v for k, v in ema.state_dict().items()}})
            raise KeyboardInterrupt  # the crash, right after the checkpoint
    try:
        train_loop(e, iter(data[start * cfg.grad_accum:]), loss_fn, cfg, on_step=on_step,
                   start_step=start)
    except KeyboardInterrupt:
        pass
    return {k: v.detach().clone() for k, v in e.module.named_parameters()}, ema

full, ema_full = run(*engine(), 0)
with tempfile.TemporaryDirectory() as d:
    torch.manual_seed(0)
    run(*engine(), 0, stop_at=5, save_to=d)
    e, ema = engine()
    torch.manual_seed(123)  # a fresh process: another RNG state until restored
    state, tensors = restore_checkpoint(e, d, 0)  # digests verified, weights-only
    restore_rng(tensors)
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    resumed, ema_resumed = run(e, ema, state.step)
assert state.step == 5
for k in full:
    assert torch.equal(full[k], resumed[k]), k
    assert torch.equal(ema_full.shadow[k], ema_resumed.shadow[k]), k
print("EQUIVALENT")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_resume_matches_an_uninterrupted_run(tmp_path):
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(ROOT / ".cache" / "torch_extensions")))
    p = subprocess.run([sys.executable, "-c", _EQUIVALENCE, str(_free_port())], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "EQUIVALENT" in p.stdout, p.stdout[-3000:] + p.stderr[-6000:]


def test_rank0_reads_how_far_the_tracking_run_got(tmp_path):
    """A restarted rank 0 asks the MLflow run for its last logged step (its log floor)."""
    from pipelines.stages.train import _logged_through
    from vgen_core.tracking import MlflowTracker, NullTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowTracker.start(uri, experiment="resume-unit", run_name="stage",
                              artifact_location=str(tmp_path / "artifacts"))
    worker = MlflowTracker.attach(uri, run.run_id)
    assert _logged_through(worker) is None
    for step in (1, 2, 3, 7):
        worker.log_metrics({"train/loss": 1.0 / step}, step=step)
    assert _logged_through(worker) == 7
    assert log_floor(5, _logged_through(worker)) == 7
    assert _logged_through(NullTracker()) is None


def test_deepspeed_precision_per_device():
    from vgen_core.training import deepspeed_config

    cuda = deepspeed_config(TrainConfig(), torch.device("cuda"))
    assert cuda["bf16"] == {"enabled": True, "check_grad_overflow": False}
    cpu = deepspeed_config(TrainConfig(grad_accum=4, zero_stage=3), torch.device("cpu"))
    assert "bf16" not in cpu and "fp16" not in cpu
    assert cpu["gradient_accumulation_steps"] == 4 and cpu["zero_optimization"]["stage"] == 3
    assert cpu["gradient_clipping"] == 1.0
