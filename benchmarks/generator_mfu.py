"""Model FLOPs utilisation of the generators' training step, eager and compiled, per family and
size (plain PyTorch step, the compute inside one Ray Train worker; the stage's own overhead is
benchmarks/train_overhead.py).

    python benchmarks/generator_mfu.py --device cuda --batch 256 --peak-tflops 989
        # default models maskgit:B maskgit:L rar:B rar:L deepflow:B/2 deepflow:XL/2 (H100/H200)
    python benchmarks/generator_mfu.py --device cpu --models maskgit:tiny rar:tiny \\
        deepflow:tiny --batch 8 --threads 1 --peak-tflops 1   # CPU smoke run, MFU vs the peak given

Per model and mode: build at the size (same seed), bf16 autocast on CUDA (fp32 on CPU), AdamW
(fused on CUDA), ``--warmup`` steps (the compiled mode compiles in the first one: its time is
printed as ``first step``), then ``--windows`` windows of ``--steps`` timed optimizer steps, one
synchronisation at the end of each; the best window counts (on a shared machine another process
can only slow a window down). ``compiled`` is ``torch.compile`` of the model with static shapes,
exactly what the train stage does with ``train.compile: true``
(``vgen_core.training.step.compile_model``); the loss around it stays eager.
``--activation-checkpointing`` wraps the transformer blocks as
``train.activation_checkpointing: true`` does (its recomputation is not counted as useful FLOPs).

Training FLOPs per step = 6 x (parameters that see every token) x tokens per step (+ the attention
score/value products, 12 x layers x width x sequence^2 per sample), the convention of the
PaLM/MFU papers. MFU = achieved FLOP/s / peak. Prints one line per model and mode, then
compiled/eager per model (same run, same device). ``--audit`` first runs each model's training
forward once and reports its attention calls: SDPA calls that FlashAttention can take (no mask,
head width <= 256, multiple of 8), masked SDPA calls (memory-efficient kernel instead), and
softmax calls outside SDPA (a hand-written attention would show here; the loss's own softmax
too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = ["maskgit:B", "maskgit:L", "rar:B", "rar:L", "deepflow:B/2", "deepflow:XL/2"]


def make_batch(task, model, batch: int):
    """A random batch of the family's data kind (its spec's ``example_batch``) and the tokens
    per sample the transformer sees (sequence length, or latent patches)."""
    cfg = model.config
    data = task.example_batch(cfg, batch, generator=torch.Generator().manual_seed(0))
    if "tokens" in data:
        return data, cfg.seq_len
    if "moments" in data:
        m = data["moments"]
        patch = getattr(cfg, "patch_size", 1) or 1
        return data, (m.shape[-2] // patch) * (m.shape[-1] // patch)
    raise SystemExit(f"no MFU token count for {task.name} (data: {task.data})")


def attention_flops(model, seq: int) -> float:
    cfg = model.config
    depth = getattr(cfg, "depth", None) or (getattr(cfg, "encoder_depth", 0)
                                            + getattr(cfg, "decoder_depth", 0))
    return 12.0 * depth * cfg.hidden * seq * seq


class _AttentionAudit(TorchFunctionMode):
    """Counts SDPA calls (flash-eligible or masked) and softmax calls outside SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.flash = self.masked = self.softmax = 0
        self.reasons: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            d = q.shape[-1]
            if mask is not None:
                self.masked += 1
                self.reasons.add("attn_mask")
            elif d > 256 or d % 8:
                self.masked += 1
                self.reasons.add(f"head width {d}")
            else:
                self.flash += 1
        elif func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax,
                      torch.nn.functional.log_softmax, torch.Tensor.log_softmax):
            self.softmax += 1
        return func(*args, **kwargs)


def audit(task, model, batch) -> str:
    with torch.no_grad(), _AttentionAudit() as a:
        task.loss(model, batch, 0)
    why = f" ({', '.join(sorted(a.reasons))})" if a.reasons else ""
    return (f"attention: {a.flash} SDPA flash-eligible, {a.masked} SDPA not{why}, "
            f"{a.softmax} softmax outside SDPA")


def run(task, size: str, mode: str, args, device: torch.device) -> dict[str, Any]:
    from vgen_core.training.step import checkpoint_blocks, compile_model

    torch.manual_seed(0)
    model = task.build(size, {}, {}).to(device).train()
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, seq = make_batch(task, model, args.batch)
    batch = {k: v.to(device) for k, v in batch.items()}
    audit_line = None
    if args.audit and mode == "eager":
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            audit_line = audit(task, model, batch)
    if mode == "compiled":
        compile_model(model)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)

    def step(i: int) -> torch.Tensor:
        with amp:
            loss, _ = task.loss(model, batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step(0)  # compiles in the compiled mode
    sync()
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last, times, i = torch.zeros(()), [], args.warmup
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            last = step(i)
            i += 1
        sync()
        times.append((time.perf_counter() - t0) / args.steps)
    dt = min(times)  # the best window: another process can slow a window down, never speed it up
    flops = 6.0 * (params - emb) * args.batch * seq + 3 * attention_flops(model, seq) * args.batch
    out = {"params": params, "seq": seq, "dt": dt, "tflops": flops / dt / 1e12,
           "first": first, "loss": float(last), "audit": audit_line,
           "mem": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del step  # frees the model and optimizer before the next one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="family:size (e.g. maskgit:B, deepflow:B/2)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                    choices=["eager", "compiled"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per window")
    ap.add_argument("--windows", type=int, default=3,
                    help="timed windows; the best one counts (fair on a shared machine)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compile included)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the device (H100 SXM 989, H200 989); on CPU give "
                    "the core's fp32 peak, or read TFLOP/s instead")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op CPU threads (on a shared machine 1 avoids OpenMP threads "
                    "waiting on each other)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--audit", action="store_true",
                    help="report each model's attention calls (flash-eligible SDPA or not)")
    args = ap.parse_args()
    args.warmup = max(args.warmup, 1)
    from vgen_core.training.tasks import get_task

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"device: {label}; batch {args.batch}, best of {args.windows} windows of {args.steps} "
          f"steps after {args.warmup}; "
          f"peak {args.peak_tflops:g} TFLOP/s"
          + ("; activation checkpointing" if args.activation_checkpointing else ""))
    ratios = []
    for spec in args.models:
        family, size = spec.split(":", 1)
        task = get_task(family)
        results = {}
        for mode in args.modes:
            r = results[mode] = run(task, size, mode, args, device)
            if r["audit"]:
                print(f"{spec:<16} {r['audit']}")
            mem = f"  peak mem {r['mem']:.1f} GiB" if r["mem"] is not None else ""
            print(f"{spec:<16} {mode:<8}  params {r['params'] / 1e6:7.1f}M  "
                  f"batch {args.batch} x {r['seq']} tokens  {1 / r['dt']:7.2f} steps/s  "
                  f"{args.batch * r['seq'] / r['dt']:10.0f} tokens/s  {r['tflops']:8.3f} TFLOP/s  "
                  f"MFU {r['tflops'] / args.peak_tflops:.3f}  first step {r['first']:.1f}s"
                  f"{mem}  loss {r['loss']:.3f}", flush=True)
        if "eager" in results and "compiled" in results:
            ratios.append((spec, results["compiled"]["tflops"] / results["eager"]["tflops"]))
    for spec, ratio in ratios:
        print(f"{spec:<16} compiled / eager  {ratio:.2f}x")


if __name__ == "__main__":
    main()
