"""Sampling time of a small DeepFlow, xAR or DiMR with dense vs GRAT self-attention
(`sample(attention=...)`).

    PYTHONPATH=. python benchmarks/grat_sampling.py --threads 1           # CPU: tiny-ish DeepFlow
    PYTHONPATH=. python benchmarks/grat_sampling.py --family xar --input-size 16 --threads 1
    PYTHONPATH=. python benchmarks/grat_sampling.py --family dimr --input-size 16 --threads 1
    PYTHONPATH=. python benchmarks/grat_sampling.py --device cuda --input-size 128 \
        --hidden 768 --depth 12 --heads 12 --groups 8 8 --steps 50 --batch 8   # GPU: 4096 tokens

Builds the `--family` model from the flags (random weights with non-zero heads, seeded; no
training: this measures time, not quality), then samples the same labels and noise, unguided,
with dense attention and with each GRAT setting: one warm-up each, then `--repeats` rounds in
which the settings take turns. Prints per setting the median seconds per image, the ratio GRAT /
dense (< 1 = faster), the GRAT density (fraction of the (query, key) pairs the dense attention
computes that GRAT keeps) and the relative difference of the samples from the dense ones.

Token grids: DeepFlow (s/2)^2 patch tokens; xAR s^2 latent tokens in 4 cells, block-causal (the
density is then counted within the block-causal pairs; the GRAT mask is intersected with it and
run through masked SDPA, never the kernel, so expect no speed-up on any device); DiMR a
Transformer stage on (s/2)^2 tokens plus its class token (dense), then a 2-block ConvNeXt stage
at s x s. The GRAT backend of DeepFlow and DiMR is the `kernels.grat` dispatch: the block-sparse
Triton kernel on CUDA, the dense-mask PyTorch reference on CPU (full attention plus a mask and two
token permutations, so expect no speed-up there). Nothing is asserted; tests/unit/
test_grat_sampling.py and test_grat_sampling_more.py hold the correctness checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.grat import grat_density
from kernels.grat.reference import make_spec
from vgen_core.generators import deepflow, dimr, xar
from vgen_core.generators.deepflow import DeepFlowConfig
from vgen_core.generators.dimr import DiMRConfig
from vgen_core.generators.flow import inference_attention_options
from vgen_core.generators.xar import XARConfig

FAMILIES = ("deepflow", "xar", "dimr")


def _config(args: argparse.Namespace) -> DeepFlowConfig | XARConfig | DiMRConfig:
    if args.family == "xar":
        enc = max(1, args.depth // 2)
        return XARConfig(latent_size=args.input_size, in_channels=4, hidden=args.hidden,
                         encoder_depth=enc, decoder_depth=max(1, args.depth - enc),
                         heads=args.heads, num_classes=10)
    if args.family == "dimr":
        stages = (dimr._transformer(args.hidden, args.depth, args.heads),
                  dimr._convnext(max(8, args.hidden // 2), 2))
        return DiMRConfig(input_size=args.input_size, num_classes=10, stages=stages)
    return DeepFlowConfig(input_size=args.input_size, hidden=args.hidden, depth=args.depth,
                          heads=args.heads, df_idxs=(args.depth // 2,), acc_hidden=args.hidden,
                          num_classes=10)


def _grid(args: argparse.Namespace) -> int:
    """Side of the token grid the self-attention runs over."""
    return args.input_size if args.family == "xar" else args.input_size // 2


def _sampler(family: str, model: torch.nn.Module, labels: torch.Tensor, steps: int,
             device: torch.device) -> Callable[..., Callable[[], torch.Tensor]]:
    """kw -> a function sampling the same noise every run, unguided (xAR: cfg 1)."""
    extra: dict[str, Any] = {"xar": {"cfg": 1.0}}.get(family, {})
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "deepflow": deepflow.sample, "xar": xar.sample, "dimr": dimr.sample}
    fn = fns[family]

    def make(**kw):
        def run() -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(0)
            return fn(model, labels, num_steps=steps, generator=g, **extra, **kw)
        return run
    return make


def _density(args: argparse.Namespace, model: torch.nn.Module, kw: dict) -> float:
    """Kept fraction of the (query, key) pairs dense attention computes, for one GRAT setting."""
    grid, (gh, gw) = _grid(args), args.groups
    variant, radius = kw["grat_variant"], kw.get("grat_radius", 1)
    if args.family == "xar":
        assert isinstance(model, xar.XAR)
        opts = inference_attention_options("grat", (grid, grid), groups=(gh, gw),
                                           variant=variant, radius=radius)
        mask = xar.grat_sequence_mask(model.config, opts)
        assert mask is not None
        causal = model.mask.cpu()
        return float((mask & causal).sum() / causal.sum())
    n_text = 1 if args.family == "dimr" else 0  # DiMR's class token, dense
    return grat_density(make_spec((1, grid, grid), (1, gh, gw), variant, n_text, None,
                                  (0, radius, radius)))


def _model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    cfg = _config(args)
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
    ap.add_argument("--family", choices=FAMILIES, default="deepflow")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--input-size", type=int, default=32,
                    help="latent side s (tokens: (s/2)^2, xAR s^2)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="sampler steps (xAR: per cell)")
    ap.add_argument("--groups", type=int, nargs=2, default=[4, 4], help="GRAT group (gh, gw)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args, device)
    grid = _grid(args)
    labels = torch.arange(args.batch, device=device) % 10
    settings: list[tuple[str, dict[str, Any]]] = [
        ("GRAT-X", dict(grat_variant="criss_cross")),
        ("GRAT-B r=1", dict(grat_variant="block", grat_radius=1)),
    ]
    gh, gw = args.groups
    run_seeded = _sampler(args.family, model, labels, args.steps, device)

    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f"{f', {threads} threads' if threads else ''}); {args.family} {args.hidden}x"
          f"{args.depth}, {grid}x{grid} = {grid * grid} tokens, batch {args.batch}, "
          f"{args.steps} steps, groups ({gh}, {gw}); median of {args.repeats}")
    fns = {"dense": run_seeded()}
    fns.update({name: run_seeded(attention="grat", grat_groups=(gh, gw), **kw)
                for name, kw in settings})
    results = _time_interleaved(fns, args.repeats, device)
    dense_s, dense = results["dense"]
    print(f"{'dense':<12} {dense_s / args.batch:9.4f} s/image")
    for name, kw in settings:
        t, out = results[name]
        rel = float((out - dense).norm() / dense.norm())
        print(f"{name:<12} {t / args.batch:9.4f} s/image  ratio grat/dense {t / dense_s:5.2f}  "
              f"density {_density(args, model, kw):.3f}  rel. diff of samples {rel:.2e}")

if __name__ == "__main__":
    main()
