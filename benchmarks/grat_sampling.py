"""Sampling time of a small DeepFlow with dense vs GRAT self-attention (`sample(attention=...)`).

    PYTHONPATH=. python benchmarks/grat_sampling.py --threads 1           # CPU: tiny-ish model
    PYTHONPATH=. python benchmarks/grat_sampling.py --device cuda --input-size 128 \
        --hidden 768 --depth 12 --heads 12 --groups 8 8 --steps 50 --batch 8   # GPU: 4096 tokens

Builds DeepFlow from the flags (random weights with non-zero heads, seeded; no training: this
measures time, not quality), then samples the same labels and noise with dense attention and with
each GRAT setting: one warm-up each, then `--repeats` rounds in which the settings take turns.
Prints per setting the median time, the ratio GRAT / dense (< 1 = faster), the GRAT density
(fraction of (query, key) pairs computed) and the relative difference of the samples from the
dense ones. The GRAT backend is the `kernels.grat` dispatch: the block-sparse Triton kernel on
CUDA, the dense-mask PyTorch reference on CPU (full attention plus a mask and two token
permutations, so expect no speed-up there). Nothing is asserted; tests/unit/test_grat_sampling.py
holds the correctness checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.grat import grat_density
from kernels.grat.reference import make_spec
from vgen_core.generators import deepflow
from vgen_core.generators.deepflow import DeepFlowConfig


def _model(args: argparse.Namespace, device: torch.device) -> deepflow.DeepFlow:
    cfg = DeepFlowConfig(input_size=args.input_size, hidden=args.hidden, depth=args.depth,
                         heads=args.heads, df_idxs=(args.depth // 2,), acc_hidden=args.hidden,
                         num_classes=10)
    torch.manual_seed(0)
    model = cfg.build()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised heads would make every velocity 0
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int,
                      device: torch.device) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds and last output per name; one warm-up each (Triton compilation, layout
    caches), then the settings take turns in every round, so load drift hits them alike."""
    outs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--input-size", type=int, default=32, help="latent side (tokens = (s/2)^2)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="sampler steps")
    ap.add_argument("--groups", type=int, nargs=2, default=[4, 4], help="GRAT group (gh, gw)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args, device)
    grid = args.input_size // 2
    labels = torch.arange(args.batch, device=device) % 10
    settings = [("GRAT-X", dict(grat_variant="criss_cross")),
                ("GRAT-B r=1", dict(grat_variant="block", grat_radius=1))]
    gh, gw = args.groups

    def run_seeded(**kw):
        def fn():  # same noise every run
            g = torch.Generator(device=device).manual_seed(0)
            return deepflow.sample(model, labels, num_steps=args.steps, generator=g, **kw)
        return fn

    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f"{f', {threads} threads' if threads else ''}); DeepFlow {args.hidden}x{args.depth}, "
          f"{grid}x{grid} = {grid * grid} tokens, batch {args.batch}, {args.steps} steps, "
          f"groups ({gh}, {gw}); median of {args.repeats}")
    specs = {name: make_spec((1, grid, grid), (1, gh, gw), kw["grat_variant"], 0, None,
                             (0, kw.get("grat_radius", 1), kw.get("grat_radius", 1)))
             for name, kw in settings}
    fns = {"dense": run_seeded()}
    fns.update({name: run_seeded(attention="grat", grat_groups=(gh, gw), **kw)
                for name, kw in settings})
    results = _time_interleaved(fns, args.repeats, device)
    dense_s, dense = results["dense"]
    print(f"{'dense':<12} {dense_s * 1e3:9.1f} ms")
    for name, _ in settings:
        t, out = results[name]
        rel = float((out - dense).norm() / dense.norm())
        print(f"{name:<12} {t * 1e3:9.1f} ms  ratio grat/dense {t / dense_s:5.2f}  "
              f"density {grat_density(specs[name]):.3f}  rel. diff of samples {rel:.2e}")

if __name__ == "__main__":
    main()
