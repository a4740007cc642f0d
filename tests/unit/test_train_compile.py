"""Fast training steps that compute the same thing (vgen_core.training.step): torch.compile of the
model gives eager's losses and weights, activation checkpointing eager's gradients bit for bit,
the non-finite-gradient guard skips a NaN step (weights and optimizer state untouched, also inside
a DeepSpeed ZeRO-2 bf16 engine with fused AdamW: the CUDA configuration, run here on CPU), and the
execution settings stay out of the stage fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vgen_core.training import TrainConfig, get_task, train_loop
from vgen_core.training.step import (
    FiniteGuard,
    attention_backends,
    checkpoint_blocks,
    compile_model,
    make_optimizer,
)

ROOT = Path(__file__).resolve().parents[2]


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a poisoned gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _Engine:
    """DeepSpeed's surface the loop uses, around a plain module and optimizer (one micro-step
    per optimizer step)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _maskgit_run(compiled: bool, steps: int = 3):
    task = get_task("maskgit")
    torch.manual_seed(0)
    model = task.build("tiny", {}, {}).train()
    if compiled:
        compile_model(model)
    cfg = TrainConfig(steps=steps, micro_batch_size=4, lr=3e-3, log_every=1, schedule="constant")
    engine = _Engine(model, make_optimizer(model.parameters(), cfg, torch.device("cpu")))
    g = torch.Generator().manual_seed(1)
    data = [task.example_batch(model.config, 4, generator=g) for _ in range(steps)]
    losses: list[float] = []
    torch.manual_seed(2)  # the loss draws its masks from the global RNG
    train_loop(engine, iter(data), task.loss, cfg, on_log=lambda s, m: losses.append(m["loss"]))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compiled_steps_match_eager():
    eager_losses, eager_w = _maskgit_run(compiled=False)
    comp_losses, comp_w = _maskgit_run(compiled=True)
    assert len(eager_losses) == len(comp_losses) == 3
    assert comp_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[-1] != eager_losses[0]  # the weights moved: the steps compared are real
    assert list(comp_w) == list(eager_w)  # compile in place: no `_orig_mod.` names
    for k in eager_w:
        torch.testing.assert_close(comp_w[k], eager_w[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("family,overrides,blocks", [
    ("maskgit", {"dropout": 0.1, "attn_dropout": 0.1}, ["blocks.0", "blocks.1"]),
    ("rar", {}, ["blocks.0", "blocks.1"]),
    ("deepflow", {}, ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "df_blocks.0"]),
], ids=["maskgit-dropout", "rar", "deepflow"])
def test_activation_checkpointing_gives_the_same_gradients(family, overrides, blocks):
    task = get_task(family)
    runs = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = task.build("tiny", overrides, {}).train()
        names = checkpoint_blocks(model) if ac else []
        batch = task.example_batch(model.config, 4, generator=torch.Generator().manual_seed(0))
        saved = [0]

        def pack(x, saved=saved):
            saved[0] += 1
            return x

        torch.manual_seed(1)  # same masks / noise / dropout draws in both runs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss, _ = task.loss(model, batch, 0)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, saved[0], names, list(model.state_dict())))
    (loss0, g0, saved0, _, keys0), (loss1, g1, saved1, names, keys1) = runs
    assert names == blocks
    assert keys1 == keys0  # parameter names and checkpoints unchanged
    assert saved1 < saved0 / 2  # the blocks keep only their inputs for the backward
    assert torch.equal(loss1, loss0)
    assert set(g1) == set(g0) and g0
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k


def test_a_family_checkpointing_its_own_blocks_is_left_alone():
    dimr = get_task("dimr")
    assert checkpoint_blocks(dimr.build("tiny", {}, {})) == [
        f"stages.{s}.blocks.{i}" for s in range(2) for i in range(3)]
    assert checkpoint_blocks(dimr.build("tiny", {"grad_checkpointing": True}, {})) == []


def test_checkpointed_blocks_run_plainly_without_grad():
    task = get_task("maskgit")
    torch.manual_seed(0)
    model = task.build("tiny", {}, {}).eval()
    tokens = torch.randint(0, 256, (2, 64))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        before = model(tokens, labels)
    assert checkpoint_blocks(model) == ["blocks.0", "blocks.1"]
    assert checkpoint_blocks(model) == []  # wrapping twice is a no-op
    with torch.no_grad():
        assert torch.equal(model(tokens, labels), before)


def _guarded_steps(fused: bool, poison_second: bool):
    """Three AdamW steps on a small MLP (second one poisoned or left out); weights, state and
    the guard after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    guard = FiniteGuard(opt)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    snaps = []
    for i in range(3):
        if i == 1 and not poison_second:
            continue
        out = model(x)
        if i == 1:
            out = _NanGrad.apply(out)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                      {k: v.clone() for s in opt.state.values() for k, v in s.items()}))
    return snaps, guard


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_guard_skips_a_nan_gradient_step(fused):
    snaps, guard = _guarded_steps(fused, poison_second=True)
    (w1, s1), (w2, s2), (w3, _) = snaps
    assert guard.skipped_steps() == 1
    for k in w1:
        assert torch.equal(w2[k], w1[k]), k  # the NaN step changed nothing
        assert torch.isfinite(w3[k]).all() and not torch.equal(w3[k], w1[k])
    for k in s1:
        assert torch.equal(s2[k], s1[k]), k  # moments and step count untouched
    clean, clean_guard = _guarded_steps(fused, poison_second=False)
    assert clean_guard.skipped_steps() == 0
    for k in w3:  # clean, NaN, clean == clean, clean
        assert torch.equal(clean[-1][0][k], w3[k]), k


def test_guard_removed_lets_nan_through():
    """The control: without the guard the same step writes NaN into the weights."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    FiniteGuard(opt).remove()
    _NanGrad.apply(model(torch.ones(2, 3))).sum().backward()
    opt.step()
    assert not torch.isfinite(model.weight).all()


def test_optimizer_is_fused_on_cuda_only():
    cfg = TrainConfig(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    p = [torch.nn.Parameter(torch.zeros(2))]
    cpu = make_optimizer(p, cfg, torch.device("cpu"))
    cuda = make_optimizer(p, cfg, torch.device("cuda"))
    assert not cpu.defaults["fused"] and cuda.defaults["fused"] is True
    assert cpu.defaults["lr"] == 2e-3 and cpu.defaults["betas"] == (0.9, 0.95)
    assert cpu.defaults["weight_decay"] == 0.05


def test_attention_prefers_flash_on_cuda_only():
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    with attention_backends(torch.device("cpu")):
        assert torch._C._get_sdp_priority_order() == before
    with attention_backends(torch.device("cuda")):
        order = torch._C._get_sdp_priority_order()
        assert order[:2] == [int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION)]
    assert torch._C._get_sdp_priority_order() == before


def _row_fingerprint(tmp_path, train: dict) -> str:
    from pipelines.dag.planner import build_stage
    from pipelines.dag.spec import load_dag

    dag = {"name": "fp", "stages": {
        "images": {"uses": "ingest.images", "with": {"root": str(tmp_path)}},
        "gen": {"uses": "train.tokenizer", "needs": ["images"],
                "with": {"model": "lfq", "size": "tiny", "train": train}}}}
    path = tmp_path / f"dag{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(dag))
    _, row_fp, _ = build_stage(load_dag(str(path)), "gen", None, {})
    return row_fp


def test_execution_settings_stay_out_of_the_fingerprint(tmp_path):
    base = _row_fingerprint(tmp_path, {"steps": 10})
    fast = _row_fingerprint(tmp_path, {"steps": 10, "compile": True,
                                       "activation_checkpointing": True})
    other = _row_fingerprint(tmp_path, {"steps": 10, "lr": 5e-4})
    assert fast == base and other != base
    cfg = TrainConfig(steps=10, compile=True, activation_checkpointing=True)
    assert "compile" not in cfg.model_dump() and "activation_checkpointing" not in cfg.model_dump()
    again = TrainConfig.model_validate(cfg.dump())  # what a worker receives
    assert again.compile and again.activation_checkpointing and again == cfg


_DEEPSPEED = r"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import torch, deepspeed
from vgen_core.training import TrainConfig, deepspeed_config, train_loop
from vgen_core.training.step import FiniteGuard, compile_model, make_optimizer

deepspeed.init_distributed(dist_backend="gloo")

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): return g * float("nan")

def loss_fn(module, batch, step):
    out = module(batch["x"].to(next(module.parameters()).dtype))
    if batch["poison"]:
        out = NanGrad.apply(out)
    return out.float().pow(2).mean(), {}

def engine(zero, precision, fused, guarded=True, compiled=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    cfg = TrainConfig(steps=3, zero_stage=zero, precision=precision, micro_batch_size=4, lr=1e-2,
                      log_every=1, schedule="constant")
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    opt = make_optimizer(groups, cfg, torch.device("cuda" if fused else "cpu"))
    e, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                 config=deepspeed_config(cfg, torch.device("cpu")),
                                 dist_init_required=False)
    if compiled:
        compile_model(e)
    return e, cfg, (FiniteGuard(opt, e.optimizer) if guarded else None)

g = torch.Generator().manual_seed(1)
xs = [torch.randn(4, 6, generator=g) for _ in range(3)]

def run(e, cfg, guard, poison):
    weights, logged = [], []
    def on_step(step, last):
        weights.append({k: v.detach().float().clone() for k, v in e.module.state_dict().items()})
    data = [{"x": x, "poison": i == 1 and poison} for i, x in enumerate(xs)]
    train_loop(e, iter(data), loss_fn, cfg, on_step=on_step, guard=guard,
               on_log=lambda s, m: logged.append(m))
    return weights, logged

for zero, precision, fused in [(2, "bf16", True), (0, "fp32", False), (2, "fp32", False)]:
    w, logged = run(*engine(zero, precision, fused), poison=True)
    same = all(torch.equal(w[1][k], w[0][k]) for k in w[0])
    finite = all(torch.isfinite(v).all() for v in w[2].values())
    moved = any(not torch.equal(w[2][k], w[0][k]) for k in w[0])
    print(f"GUARD zero{zero} {precision} skipped={logged[-1]['skipped_steps']:g} "
          f"unchanged={same} finite={finite} moved={moved}")

w, _ = run(*engine(2, "bf16", True, guarded=False), poison=True)
print(f"UNGUARDED zero2 bf16 finite={all(torch.isfinite(v).all() for v in w[1].values())}")

_, eager = run(*engine(2, "fp32", False), poison=False)
_, comp = run(*engine(2, "fp32", False, compiled=True), poison=False)
print("COMPILED", [round(m["loss"], 6) for m in eager] == [round(m["loss"], 6) for m in comp],
      eager[0]["loss"] != eager[-1]["loss"])
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_guard_and_compile_inside_a_deepspeed_engine(tmp_path):
    """ZeRO-2 bf16 with fused AdamW and ``check_grad_overflow`` off (what a CUDA worker runs):
    without the guard a NaN gradient reaches the weights; with it the step is skipped. ZeRO-0
    fp32 (no DeepSpeed check at all) likewise; ZeRO-2 fp32 is skipped by DeepSpeed itself and
    the guard agrees. ``compile_model(engine)`` (``engine.compile``) gives eager's losses."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(ROOT / ".cache" / "torch_extensions")))
    p = subprocess.run([sys.executable, "-c", _DEEPSPEED, str(_free_port())], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-6000:]
    for zero, precision in [(2, "bf16"), (0, "fp32"), (2, "fp32")]:
        assert (f"GUARD zero{zero} {precision} skipped=1 unchanged=True finite=True moved=True"
                in out), out
    assert "UNGUARDED zero2 bf16 finite=False" in out, out
    assert "COMPILED True True" in out, out


def _stage_dag(tmp_path, images, compile_: bool) -> Path:
    dag = {"name": "compiled", "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(images), "crops_per_image": 2, "size": 32}},
        "tokenizer": {
            "uses": "train.tokenizer", "needs": ["images"],
            "with": {"model": "titok", "size": "tiny",
                     "train": {"steps": 6, "micro_batch_size": 4, "log_every": 2,
                               "checkpoint_every": 0, "zero_stage": 2, "compile": compile_,
                               "activation_checkpointing": compile_}},
            "resources": {"workers": 1, "cpus": 1}}}}
    path = tmp_path / "compiled.yaml"
    path.write_text(yaml.safe_dump(dag))
    return path


@pytest.mark.slow
def test_train_stage_compiled_with_checkpointing_and_not_retrained_without(tmp_path):
    """The real stage (Ray Train, DeepSpeed ZeRO-2) trains a TiTok with compile and activation
    checkpointing on, records both as MLflow tags and the guard's skipped_steps; switching them
    off leaves the stage up-to-date (not part of the fingerprint)."""
    import os

    from mlflow.tracking import MlflowClient

    from vgen_core.data.sample_images import export_photos

    vgen = [sys.executable, "-m", "pipelines.cli"]

    images, storage = tmp_path / "images", tmp_path / "store"
    export_photos(images)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(vgen + ["run", str(_stage_dag(tmp_path, images, True)),
                                       "--storage", str(storage)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("compiled")
    (stage,) = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("vgen.stage") == "tokenizer"]
    assert stage.data.tags["vgen.train.compile"] == "true"
    assert stage.data.tags["vgen.train.activation_checkpointing"] == "true"
    history = client.get_metric_history(stage.info.run_id, "train/skipped_steps")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(2, 0.0), (4, 0.0), (6, 0.0)]
    plan = subprocess.run(vgen + ["plan", str(_stage_dag(tmp_path, images, False)),
                                        "--storage", str(storage), "--format", "json"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    states = {s["stage"]: s["state"] for s in json.loads(plan.stdout)["stages"]}
    assert states == {"images": "up-to-date", "tokenizer": "up-to-date"}, plan.stdout
