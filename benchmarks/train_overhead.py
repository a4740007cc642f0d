"""Overhead of the train stage: steps/s of the stage's worker loop (Ray Train, 1 worker, DeepSpeed,
batches from a Ray Data shard, metrics to MLflow) against a plain PyTorch loop on the same model,
batch and cores.

    .venv/bin/python benchmarks/train_overhead.py                      # CPU, MaskGIT "small"
    .venv/bin/python benchmarks/train_overhead.py --size tiny --threads 2
    .venv/bin/python benchmarks/train_overhead.py --device cuda --size B --batch 256 \\
        --peak-tflops 989                                               # H100 SXM, bf16 dense

Further lines isolate DeepSpeed: the same ``train_loop`` around a DeepSpeed engine in this process
(one-rank process group, batches already in memory), i.e. the stage without Ray, once per
non-finite-gradient check (``--guards``): ``guard`` is what the stage runs ("DeepSpeed loop, no
Ray": ``vgen_core.training.step.FiniteGuard``, one scalar test of the gradient norm DeepSpeed
computes anyway, no host sync with fused AdamW), ``none`` no check at all ("DeepSpeed,
unguarded": bf16 applied a NaN gradient before the guard), ``deepspeed`` DeepSpeed's own bf16
``check_grad_overflow`` scan (per gradient, one host sync; in fp32 DeepSpeed's ZeRO-1/2 always
test the norm). The guard's cost is the "FiniteGuard / unguarded" ratio of the same run.
``--without-ray`` measures only these and the plain loop (for machines without Ray).

Timing: each loop runs one warm-up window and then ``--steps`` steps in windows of ``--window``
steps (the stage's logging windows, read back from its MLflow run). Per loop the median and the
best window are printed; on a shared machine the best windows are the fair comparison (another
process stealing the core slows any window down, never speeds it up). The plain loop runs before
and after the stage; both runs count. Same model (training task registry), AdamW, gradient
clipping 1.0, micro-batch ``--batch``, ``--threads`` intra-op threads (the Ray worker reserves as
many CPUs; its data pipeline gets one more). On CUDA the stage trains in DeepSpeed bf16 and the
plain loop under bf16 autocast, both with fused AdamW. ``--compile`` compiles the model in every
loop (``train.compile: true`` in the stage). MFU = 6 * params * tokens/s / peak FLOP/s
(``--peak-tflops``). Goal on CPU: stage / plain >= 0.85.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: benchmark-only size between the registry's "tiny" (CPU tests) and "B"
SIZES = {"small": ("tiny", {"hidden": 256, "depth": 4, "heads": 4, "mlp_dim": 1024})}


def model_spec(size: str) -> tuple[str, dict, dict]:
    """(registry size, overrides, data_info) for a MaskGIT of ``size``."""
    from vgen_core.generators.masked import maskgit_config

    base, overrides = SIZES.get(size, (size, {}))
    cfg = maskgit_config(base, **overrides)
    info = {"codebook_size": cfg.codebook_size, "seq_len": cfg.seq_len,
            "num_classes": cfg.num_classes}
    return base, overrides, info


def make_data(rows: int, info: dict, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(0, info["codebook_size"], (rows, info["seq_len"]), dtype=np.int64),
            rng.integers(0, info["num_classes"], rows, dtype=np.int64))


def _memory_batches(args, info: dict, device):
    import torch

    tokens, labels = make_data(args.batch * 8, info)
    return [{"tokens": torch.from_numpy(tokens[i::8]).to(device),
             "label": torch.from_numpy(labels[i::8]).to(device)} for i in range(8)]


def _total_steps(args) -> int:
    return args.window * (1 + -(-args.steps // args.window))


def plain_loop(args, base: str, overrides: dict, info: dict) -> tuple[list[float], int]:
    """(steps/s of each timed window, parameter count) of a hand-written PyTorch loop."""
    import torch

    from vgen_core.training import compile_model, get_task, make_optimizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    task = get_task("maskgit")
    torch.manual_seed(0)
    model = task.build(base, overrides, info).to(device)
    if args.compile:
        compile_model(model)
    opt = make_optimizer(model.parameters(), _train_config(args), device)
    batches = _memory_batches(args, info, device)
    rates, t0 = [], time.perf_counter()
    for step in range(_total_steps(args)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _ = task.loss(model, batches[step % 8], step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.window == 0:
            if cuda:
                torch.cuda.synchronize()
            rates.append(args.window / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    return rates[1:], sum(p.numel() for p in model.parameters())


def engine_loop(args, base: str, overrides: dict, info: dict,
                guard: str = "guard") -> tuple[list[float], dict]:
    """(steps/s of each timed window, last metrics) of ``train_loop`` around a DeepSpeed engine
    in this process, with the non-finite-gradient check ``guard`` (see the module docstring)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from vgen_core.training import (FiniteGuard, compile_model, deepspeed_config, get_task,
                                    make_optimizer, train_loop)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    task = get_task("maskgit")
    torch.manual_seed(0)
    model = task.build(base, overrides, info).to(device)
    tcfg = _train_config(args)
    opt = make_optimizer(model.parameters(), tcfg, device)
    ds_config = deepspeed_config(tcfg, device)
    if guard == "deepspeed" and "bf16" in ds_config:
        ds_config["bf16"]["check_grad_overflow"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config,
                                      dist_init_required=False)
    finite_guard = FiniteGuard(opt, engine.optimizer) if guard == "guard" else None
    if args.compile:
        compile_model(engine)
    batches = _memory_batches(args, info, device)

    def forever():
        i = 0
        while True:
            yield batches[i % 8]
            i += 1

    rates: list[float] = []
    last = train_loop(engine, forever(), task.loss, tcfg, tokens_per_sample=info["seq_len"],
                      on_log=lambda step, m: rates.append(m["steps_per_second"]),
                      guard=finite_guard)
    engine.destroy()
    return rates[1:], last


def _train_config(args):
    from vgen_core.training import TrainConfig

    return TrainConfig(steps=_total_steps(args), micro_batch_size=args.batch, lr=1e-4,
                       zero_stage=args.zero_stage, log_every=args.window, checkpoint_every=0,
                       max_failures=0, compile=args.compile)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_fn(cfg: dict) -> None:
    import torch

    from pipelines.stages.train import _worker_loop

    torch.set_num_threads(cfg.pop("threads"))
    _worker_loop(cfg)


def stage_loop(args, base: str, overrides: dict, info: dict) -> tuple[list[float], dict]:
    """(steps/s of each timed window, last metrics) of the train stage's worker loop run by Ray
    Train with 1 worker; the windows come back from the MLflow run rank 0 logs into."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vgen_core.tracking import MlflowTracker

    cuda = args.device == "cuda"
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "DS_BUILD_OPS") if k in os.environ}
    env["PYTHONPATH"] = str(ROOT)
    ray.init(num_cpus=args.threads + 1, num_gpus=1 if cuda else 0, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        rows = args.batch * (_total_steps(args) + 2)  # one pass: no epoch restart inside
        tokens, labels = make_data(rows, info)
        ds = ray.data.range(rows).map_batches(
            lambda b: {"tokens": tokens[b["id"]], "label": labels[b["id"]]})
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            run = MlflowTracker.start(uri, experiment="train-overhead", run_name="stage",
                                      artifact_location=os.path.join(tmp, "artifacts"))
            cfg = {"model": "maskgit", "size": base, "overrides": overrides,
                   "train": _train_config(args).dump(), "data_info": info, "flip": False,
                   "tracking_uri": uri, "run_id": run.run_id,
                   "output_uri": os.path.join(tmp, "model"), "threads": args.threads}
            resources = {"CPU": args.threads, **({"GPU": 1} if cuda else {})}
            TorchTrainer(_train_fn, train_loop_config=cfg,
                         scaling_config=ScalingConfig(num_workers=1, use_gpu=cuda,
                                                      resources_per_worker=resources),
                         torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
                         run_config=RunConfig(storage_path=tmp, name="bench"),
                         datasets={"train": ds}).fit()
            history = run.client.get_metric_history(run.run_id, "train/steps_per_second")
            last = {k.removeprefix("train/"): v
                    for k, v in run.client.get_run(run.run_id).data.metrics.items()}
            run.finish()
            return [m.value for m in sorted(history, key=lambda m: m.step)][1:], last
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="MaskGIT size: tiny, small, B, L")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch (one worker)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps, after a warm-up window")
    ap.add_argument("--window", type=int, default=10, help="steps per timing window")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads = CPUs per worker")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--without-ray", action="store_true",
                    help="skip the Ray Train stage: plain loop vs the DeepSpeed loop only")
    ap.add_argument("--guards", nargs="+", choices=["guard", "none", "deepspeed"],
                    default=None, help="non-finite-gradient checks of the DeepSpeed loop "
                    "(default: guard none, and deepspeed on CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model everywhere")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s of the device at the training precision, for MFU")
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("DS_BUILD_OPS", "0")

    base, overrides, info = model_spec(args.size)
    before, params = plain_loop(args, base, overrides, info)
    results = {}
    if not args.without_ray:
        results["train stage, 1 worker"] = stage_loop(args, base, overrides, info)
    guards = args.guards or (["guard", "none", "deepspeed"] if args.device == "cuda"
                             else ["guard", "none"])
    # "DeepSpeed loop, no Ray" is the stage's own configuration (benchmarks/gpu_suite.py reads it)
    names = {"guard": "DeepSpeed loop, no Ray", "none": "DeepSpeed, unguarded",
             "deepspeed": "DeepSpeed, check_grad_overflow"}
    for guard in guards:
        results[names[guard]] = engine_loop(args, base, overrides, info, guard)
    after, _ = plain_loop(args, base, overrides, info)
    rows = [("plain PyTorch loop", before + after, {})] + \
        [(name, rates, last) for name, (rates, last) in results.items()]
    plain_med, plain_best = statistics.median(before + after), max(before + after)
    print(f"MaskGIT {args.size} ({params / 1e6:.2f}M params), batch {args.batch} x "
          f"{info['seq_len']} tokens, {args.threads} thread(s), {args.device}, "
          f"ZeRO-{args.zero_stage}, {len(before)} windows of {args.window} steps per run"
          + (", compiled" if args.compile else ""))
    print(f"{'':<28}  {'median':>9} {'best':>9}  steps/s   stage/plain: median  best")
    for name, rates, last in rows:
        med, best = statistics.median(rates), max(rates)
        line = (f"{name:<28}  {med:9.3f} {best:9.3f}            "
                f"{med / plain_med:12.3f} {best / plain_best:5.3f}")
        if args.peak_tflops:
            mfu = 6 * params * best * args.batch * info["seq_len"] / (args.peak_tflops * 1e12)
            line += f"  MFU(best) {100 * mfu:.1f}%"
        if "gpu_mem_max_gb" in last:
            line += f"  peak GPU memory {last['gpu_mem_max_gb']:.2f} GiB"
        print(line)
    rates = {name: r for name, (r, _) in results.items()}
    if names["guard"] in rates and names["none"] in rates:
        g, u = rates[names["guard"]], rates[names["none"]]
        print(f"FiniteGuard / unguarded: median {statistics.median(g) / statistics.median(u):.3f}"
              f"  best {max(g) / max(u):.3f}")
    if args.peak_tflops:
        print(f"MFU = 6 * params * tokens/s / {args.peak_tflops:g} TFLOP/s")


if __name__ == "__main__":
    main()
