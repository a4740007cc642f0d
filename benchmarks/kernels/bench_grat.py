"""Benchmark GRAT attention: block-sparse Triton kernel vs dense SDPA (full attention) vs the
authors' FlexAttention formulation, plus the sparsity of each setting.

    PYTHONPATH=. python benchmarks/kernels/bench_grat.py [--no-flex] [--only NAME]
        [--preset flux8k|hunyuan] [--passes fwd,fwd+bwd] [--peak-tflops 989] [--json PATH]

On a CUDA GPU, at >= 32k tokens (heads 24, head dim 128, bf16, as in HunyuanVideo): forward and
forward+backward times of dense SDPA (no mask, flash backend), FlexAttention (compiled, block mask
cached), the Triton kernel on raster-order tokens (including the two permutations) and on tokens
already in grouped order; speed-ups; the token-level density (1 - sparsity) and the density of
visited tiles; the kernel's achieved TFLOP/s over the attended pairs only, as a fraction of the
device's dense bf16 peak. Without a GPU it says so, prints each setting's density and the speed-up
bound 1 / density, and compares the dense-mask reference with dense SDPA at a small size on CPU.

``--preset`` (comma-separated for several) replaces the default settings by the paper's headline
cases (``PRESETS``, with where each number comes from): ``hunyuan`` = HunyuanVideo 768x1280, 128
frames, the official GRAT-X run (OliverRensu/GRAT @7afc1f9 main.py) and GRAT-B on the same grid;
``flux8k`` = Flux at 8192x8192 (512 x 512 tokens), GRAT-X and GRAT-B. ``--passes fwd`` skips the
backward. ``--json PATH`` writes the densities and every row as soon as it is measured, for
benchmarks/gpu_suite.py.

Shape legend: B batch, Hh heads, L tokens, D head dim.
"""

from __future__ import annotations

import argparse
import json
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

# The headline cases of the GRAT paper (35.8x over full attention for Flux at 8192x8192, up to
# 15.8x on HunyuanVideo), same tuple layout as SETTINGS.
# * hunyuan-X is the official run exactly: OliverRensu/GRAT @7afc1f9 main.py (768 x 1280 pixels,
#   128 frames -> latents frames // 4 = 32, 768 // 16 = 48, 1280 // 16 = 80; group_t, group_h,
#   group_w = 4, 8, 8; text_length=256; attenable_text = the prompt's token count, about 40 for
#   the README prompt) with cross_processor.py's criss-cross mask.
# * The official code has no GRAT-B and no Flux run (methods.md §6: [P]; the Flux settings are
#   only in the paper, whose text is not in this workspace). vgen's choices, marked [P]: GRAT-B
#   radius 1 (the 3 x 3 (x 3) surrounding groups), and Flux groups of 16 x 16 tokens: 256 tokens
#   as the official video groups (4 * 8 * 8) and a whole number of 128-token tiles. Flux at
#   8192 x 8192: VAE /8 and 2 x 2 patches -> 512 x 512 image tokens; T5 text of 512 slots
#   (FLUX.1-dev max_sequence_length), 64 of them valid. Flux puts the text first, GRAT's kernel
#   after the image: the same attention up to a permutation of the tokens.
PRESETS: dict[str, dict[str, tuple]] = {
    "hunyuan": {
        "hunyuan-X": ((32, 48, 80), (4, 8, 8), "criss_cross", 1, 256, 40),
        "hunyuan-B-r1": ((32, 48, 80), (4, 8, 8), "block", 1, 256, 40),
    },
    "flux8k": {
        "flux8k-X": ((1, 512, 512), (1, 16, 16), "criss_cross", 1, 512, 64),
        "flux8k-B-r1": ((1, 512, 512), (1, 16, 16), "block", 1, 512, 64),
    },
}
PASSES = ("fwd", "fwd+bwd")


def settings_for(args) -> dict[str, tuple]:
    """The settings this run measures: the presets' (comma-separated), or SETTINGS; ``--only``
    filters by name."""
    chosen: dict[str, tuple] = {}
    for name in (args.preset.split(",") if args.preset else []):
        if name not in PRESETS:
            raise SystemExit(f"--preset {name!r}: known presets are {', '.join(sorted(PRESETS))}")
        chosen.update(PRESETS[name])
    return {k: v for k, v in (chosen or SETTINGS).items() if not args.only or args.only in k}


def density_table(settings: dict[str, tuple]) -> list[dict]:
    """Per setting: tokens, density (attended pairs / L^2) and the FLOP bound 1 / density."""
    rows = []
    print(f"{'setting':<16} {'grid':>14} {'groups':>10} {'variant':<11} {'L':>8} {'density':>8} "
          f"{'1/density':>9}")
    for name, (grid, groups, variant, radius, n_text, n_valid) in settings.items():
        spec = make_spec(grid, groups, variant, n_text, n_valid, radius)
        dens = grat_density(spec)
        rows.append({"setting": name, "grid": list(grid), "groups": list(groups),
                     "variant": variant, "radius": radius, "n_text": n_text,
                     "n_text_valid": n_valid, "L": spec.seq_len, "density": dens})
        print(f"{name:<16} {'x'.join(map(str, grid)):>14} {'x'.join(map(str, groups)):>10} "
              f"{variant:<11} {spec.seq_len:>8} {dens:>8.4f} {1 / dens:>8.1f}x")
    return rows


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


def run_gpu(args, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Time every setting and pass; ``on_row`` sees each row as soon as it is measured."""
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
    rows: list[dict] = []
    passes = [p for p in args.passes.split(",") if p]
    for sname, (grid, groups, variant, radius, n_text, n_valid) in settings_for(args).items():
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
            if pass_name not in passes:
                continue
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
                  f"{tflops:>8.1f} {pct}", flush=True)
            rows.append({"setting": sname, "L": L, "density": dens, "tiles": tiles,
                         "pass": pass_name, "dense_ms": ms["dense"], "flex_ms": ms.get("flex"),
                         "triton_ms": ms["triton"], "triton_grouped_ms": ms["tr-grp"],
                         "x_dense": ms["dense"] / ms["triton"],
                         "x_flex": flex_ms / ms["triton"] if "flex" in ms else None,
                         "tflops": tflops, "peak_frac": tflops * 1e12 / peak if peak else None})
            on_row(rows[-1])
        del q, k, v, qg, kg, vg, do
        torch.cuda.empty_cache()
    print("dens: attended (q, k) pairs / L^2; tiles: visited 128x64 tiles / all tiles; x dense / "
          "x flex: speed-up of the Triton kernel on raster tokens (permutations included); "
          "TFLOP/s: attended-pair FLOPs of the kernel on grouped tokens (bwd = 2.5 x fwd).")
    return rows


def run_cpu(args) -> None:
    print("NOTE: no CUDA GPU present: the Triton kernel and compiled FlexAttention need one "
          "(no timings of the settings above). Comparing the dense-mask reference with dense "
          "SDPA (full attention) on CPU, small size.")
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
    ap.add_argument("--preset", default=None, metavar="|".join(sorted(PRESETS)),
                    help="the paper's headline cases instead of the default settings "
                         "(comma-separated for several)")
    ap.add_argument("--passes", default=",".join(PASSES),
                    help=f"comma-separated passes to time ({', '.join(PASSES)})")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    if unknown := [p for p in args.passes.split(",") if p and p not in PASSES]:
        raise SystemExit(f"--passes: unknown {unknown}; known: {', '.join(PASSES)}")
    densities = density_table(settings_for(args))
    out: dict = {"benchmark": "bench_grat", "preset": args.preset, "densities": densities,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "rows": []}

    def save(row: dict | None = None) -> None:  # after every row: a time cap keeps what was done
        if row is not None:
            out["rows"].append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    save()
    if torch.cuda.is_available():
        run_gpu(args, save)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
