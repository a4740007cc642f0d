"""Benchmark GRAT attention: block-sparse Triton kernel vs dense SDPA (full attention) vs the
authors' FlexAttention formulation, plus the sparsity of each setting.

    PYTHONPATH=. python benchmarks/kernels/bench_grat.py [--no-flex] [--only NAME]
        [--peak-tflops 989]

On a CUDA GPU, at >= 32k tokens (heads 24, head dim 128, bf16, as in HunyuanVideo): forward and
forward+backward times of dense SDPA (no mask, flash backend), FlexAttention (compiled, block mask
cached), the Triton kernel on raster-order tokens (including the two permutations) and on tokens
already in grouped order; speed-ups; the token-level density (1 - sparsity) and the density of
visited tiles; the kernel's achieved TFLOP/s over the attended pairs only, as a fraction of the
device's dense bf16 peak. Without a GPU it says so and compares the dense-mask reference with dense
SDPA at a small size on CPU.

Shape legend: B batch, Hh heads, L tokens, D head dim.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels.grat import grat_attention_reference, grat_density
from kernels.grat.reference import make_spec, to_grouped

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA datasheets; first match on
# the device name wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H200", 989.0, "H200 SXM datasheet"),
    ("H100 NVL", 835.0, "H100 NVL datasheet"),
    ("H100 PCIe", 756.0, "H100 PCIe datasheet"),
    ("H100", 989.0, "H100 SXM5 datasheet"),
    ("A100", 312.0, "A100 datasheet"),
]

# name: (grid, groups, variant, radius, n_text, n_text_valid)
SETTINGS = {
    # HunyuanVideo-style grid at 32k tokens: 64 frames of 512 x 1024 (latents /4 in time, /16 in
    # space), the official (4, 8, 8) groups
    "video-32k-X": ((16, 32, 64), (4, 8, 8), "criss_cross", 1, 256, 40),
    # the official run: 768 x 1280, 128 frames -> (32, 48, 80) latents, groups (4, 8, 8)
    "video-123k-X": ((32, 48, 80), (4, 8, 8), "criss_cross", 1, 256, 40),
    # groups that do not align with 64/128-token tiles
    "video-49k-X-odd": ((8, 60, 104), (2, 6, 8), "criss_cross", 1, 256, 40),
    # Flux-style 4096 x 4096 image (256 x 256 latent tokens), 16 x 16 groups: rows and columns
    # of groups (X), surrounding 3 x 3 groups (B)
    "image-65k-X": ((1, 256, 256), (1, 16, 16), "criss_cross", 1, 512, 64),
    "image-65k-B": ((1, 256, 256), (1, 16, 16), "block", 1, 512, 64),
}


def peak_flops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, "--peak-tflops"
    for key, tf, source in PEAK_TFLOPS:
        if key.lower() in name.lower():
            table = Path(__file__).name
            return tf * 1e12, f"{source} ({tf:g} TFLOP/s dense bf16, table in {table})"
    return None, "unknown device: pass --peak-tflops"


def bench_cuda(fn: Callable[[], object]) -> float:
    """Median milliseconds (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_cpu(fn: Callable[[], object], iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def fwd_bwd(attn: Callable[..., torch.Tensor], q, k, v, do) -> Callable[[], None]:
    def run() -> None:
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    return run


def run_gpu(args) -> None:
    from kernels.grat import grat_attention_flex
    from kernels.grat import triton as grat_triton
    from kernels.grat._layout import block_layout

    name = torch.cuda.get_device_name()
    peak, source = peak_flops(name, args.peak_tflops)
    print(f"device: {name}; peak from {source}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, Hh, D = args.batch, args.heads, args.dim
    head = (f"{'setting':<16} {'L':>7} {'dens':>6} {'tiles':>6} {'pass':<8} {'dense ms':>9} "
            f"{'flex ms':>9} {'triton ms':>10} {'tr-grp ms':>10} {'x dense':>8} {'x flex':>7} "
            f"{'TFLOP/s':>8} {'% peak':>7}")
    print(head)
    for sname, (grid, groups, variant, radius, n_text, n_valid) in SETTINGS.items():
        if args.only and args.only not in sname:
            continue
        spec = make_spec(grid, groups, variant, n_text, n_valid, radius)
        L = spec.seq_len
        dens = grat_density(spec)
        tiles = block_layout(spec, 128, 64, "cuda").block_density
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, Hh, L, D, device="cuda", dtype=dtype, generator=gen)
                   .requires_grad_(True) for _ in range(3))
        qg, kg, vg = (to_grouped(x.detach(), spec).requires_grad_(True) for x in (q, k, v))
        do = torch.randn_like(q)
        kw = dict(n_text_valid=n_valid, radius=radius)
        impls = {
            "dense": lambda a, b, c: F.scaled_dot_product_attention(a, b, c),
            "flex": lambda a, b, c: grat_attention_flex(a, b, c, grid, groups, variant, n_text,
                                                        **kw),
            "triton": lambda a, b, c: grat_triton.grat_attention(a, b, c, grid, groups, variant,
                                                                 n_text, **kw),
            "tr-grp": lambda a, b, c: grat_triton.grat_attention(a, b, c, grid, groups, variant,
                                                                 n_text, tokens_grouped=True, **kw),
        }
        if args.no_flex:
            impls.pop("flex")
        attended_flops = 4.0 * B * Hh * D * dens * L * L  # QK^T and PV over attended pairs
        for pass_name, flops in (("fwd", attended_flops), ("fwd+bwd", 3.5 * attended_flops)):
            ms = {}
            for iname, attn in impls.items():
                a, b, c = (qg, kg, vg) if iname == "tr-grp" else (q, k, v)
                if pass_name == "fwd":
                    with torch.no_grad():
                        ms[iname] = bench_cuda(lambda: attn(a, b, c))
                else:
                    ms[iname] = bench_cuda(fwd_bwd(attn, a, b, c, do))
            flex_ms = ms.get("flex", float("nan"))
            tflops = flops / (ms["tr-grp"] * 1e-3) / 1e12
            pct = f"{100 * tflops * 1e12 / peak:>6.1f}%" if peak else f"{'n/a':>7}"
            print(f"{sname:<16} {L:>7} {dens:>6.3f} {tiles:>6.3f} {pass_name:<8} "
                  f"{ms['dense']:>9.2f} "
                  f"{flex_ms:>9.2f} {ms['triton']:>10.2f} {ms['tr-grp']:>10.2f} "
                  f"{ms['dense'] / ms['triton']:>8.2f} {flex_ms / ms['triton']:>7.2f} "
                  f"{tflops:>8.1f} {pct}")
        del q, k, v, qg, kg, vg, do
        torch.cuda.empty_cache()
    print("dens: attended (q, k) pairs / L^2; tiles: visited 128x64 tiles / all tiles; x dense / "
          "x flex: speed-up of the Triton kernel on raster tokens (permutations included); "
          "TFLOP/s: attended-pair FLOPs of the kernel on grouped tokens (bwd = 2.5 x fwd).")


def run_cpu(args) -> None:
    print("NOTE: no CUDA GPU present: the Triton kernel and compiled FlexAttention need one. "
          "Comparing the dense-mask reference with dense SDPA (full attention) on CPU, small size.")
    grid, groups, variant, n_text = (4, 16, 16), (1, 4, 4), "criss_cross", 16
    B, Hh, D = 1, 4, 64
    spec = make_spec(grid, groups, variant, n_text)
    L = spec.seq_len
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, Hh, L, D, generator=gen) for _ in range(3))
    dense = bench_cpu(lambda: F.scaled_dot_product_attention(q, k, v), args.iters)
    refer = bench_cpu(lambda: grat_attention_reference(q, k, v, grid, groups, variant, n_text),
                      args.iters)
    print(f"grid {grid} groups {groups} {variant} text {n_text}: B={B} Hh={Hh} L={L} D={D} fp32")
    print(f"density {grat_density(spec):.3f} (sparsity {1 - grat_density(spec):.3f})")
    print(f"dense SDPA {dense:.3f} ms | GRAT reference (dense mask) {refer:.3f} ms | "
          f"reference / dense = {refer / dense:.2f} (the reference computes every pair and "
          "builds the mask: it is a specification, not a speed-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compile time)")
    ap.add_argument("--only", default=None, help="run the settings whose name contains this")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--iters", type=int, default=20, help="CPU timing repetitions")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the peak, TFLOP/s")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
