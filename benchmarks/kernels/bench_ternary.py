"""Benchmark of the ternary (1.58-bit) linear kernel.

    python benchmarks/kernels/bench_ternary.py [--shapes 3072x3072,12288x3072] [--m 1,16,4096]
        [--json PATH]

Prints (1) weight bytes against bf16 for each (out x in) shape, from TernaryLinear's buffers;
(2) on a GPU, per shape and batch M: Triton ternary latency vs a bf16 ``F.linear`` of the same
shape measured in the same run (L2 flushed before every call, as for weights of a large model),
the speed-up, and the achieved memory bandwidth against the device's peak; (3) without a GPU,
the PyTorch reference vs an fp32 matmul at a small size, and a line saying no GPU was present.
``--json PATH`` writes the GPU rows (and the storage table) for benchmarks/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels.ternary import TernaryLinear, quantize_and_pack, ternary_matmul_reference

FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)]  # (out, in) of FLUX.1-dev linears


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def storage_table(shapes: list[tuple[int, int]]) -> list[dict]:
    print("weight storage (packed 2-bit codes + fp32 per-row scale; bias not counted)")
    print(f"{'out x in':>14} {'packed B':>12} {'scale B':>9} {'bf16 B':>12} {'ratio':>8} "
          f"{'bits/w':>7}  <= 1/7.7")
    rows = []
    for N, K in shapes:
        layer = TernaryLinear(K, N, bias=False)
        packed = layer.packed.untyped_storage().nbytes()
        scale = layer.scale.untyped_storage().nbytes()
        bf16 = N * K * 2
        ratio = (packed + scale) / bf16
        print(f"{N:>6} x {K:<6} {packed:>12,} {scale:>9,} {bf16:>12,}  1/{1 / ratio:<5.2f} "
              f"{8 * (packed + scale) / (N * K):>7.3f}  {'yes' if ratio <= 1 / 7.7 else 'NO'}")
        rows.append({"N": N, "K": K, "ratio_to_bf16": ratio})
    return rows


def _peak_bandwidth_Bps(device: torch.device) -> float | None:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def gpu_bench(shapes: list[tuple[int, int]], ms: list[int]) -> list[dict]:
    import triton.testing

    from kernels.ternary.triton import ternary_matmul_triton

    device = torch.device("cuda")
    peak = _peak_bandwidth_Bps(device)
    print(f"\nGPU: {torch.cuda.get_device_name(device)}; peak memory bandwidth "
          f"{peak / 1e12:.2f} TB/s" if peak else "\nGPU: peak bandwidth unknown")
    print("latency with L2 flushed before each call (triton.testing.do_bench, mean)")
    print(f"{'M':>5} {'out x in':>14} {'ternary us':>11} {'bf16 us':>9} {'speed-up':>9} "
          f"{'tern GB/s':>10} {'bf16 GB/s':>10} {'tern %peak':>10} {'bf16 %peak':>10}")
    torch.manual_seed(0)
    rows = []
    for N, K in shapes:
        w_bf16 = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        packed, scale = quantize_and_pack(w_bf16)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                t_tern = triton.testing.do_bench(
                    lambda: ternary_matmul_triton(x, packed, scale, K)) * 1e-3
                t_bf16 = triton.testing.do_bench(lambda: F.linear(x, w_bf16)) * 1e-3
            io = 2 * M * (K + N)  # activations in and out, bf16
            tern_bytes = packed.numel() + 4 * N + io
            bf16_bytes = 2 * N * K + io
            bw_t, bw_b = tern_bytes / t_tern, bf16_bytes / t_bf16
            pct = (lambda bw: f"{100 * bw / peak:>9.0f}%") if peak else (lambda bw: f"{'?':>10}")
            print(f"{M:>5} {N:>6} x {K:<6} {t_tern * 1e6:>11.1f} {t_bf16 * 1e6:>9.1f} "
                  f"{t_bf16 / t_tern:>8.2f}x {bw_t / 1e9:>10.0f} {bw_b / 1e9:>10.0f} "
                  f"{pct(bw_t)} {pct(bw_b)}", flush=True)
            rows.append({"M": M, "N": N, "K": K, "ternary_us": t_tern * 1e6,
                         "bf16_us": t_bf16 * 1e6, "speedup": t_bf16 / t_tern,
                         "ternary_peak_frac": bw_t / peak if peak else None,
                         "bf16_peak_frac": bw_b / peak if peak else None})
    print("speed-up = bf16 time / ternary time; GB/s counts weights + activations moved once.")
    return rows


def _time_cpu(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def cpu_bench() -> None:
    torch.set_num_threads(1)  # stable numbers on small, shared machines
    print("\nno GPU present: the Triton kernels were not timed. CPU (1 thread): PyTorch "
          "reference (unpack + fp32 matmul) vs a plain fp32 matmul")
    print(f"{'M':>5} {'out x in':>12} {'reference us':>13} {'fp32 us':>9} {'ratio':>7}")
    torch.manual_seed(0)
    N = K = 512
    w = torch.randn(N, K)
    packed, scale = quantize_and_pack(w)
    for M in (1, 64):
        x = torch.randn(M, K)
        with torch.no_grad():
            t_ref = _time_cpu(lambda: ternary_matmul_reference(x, packed, scale, K), reps=20)
            t_f32 = _time_cpu(lambda: F.linear(x, w), reps=20)
        print(f"{M:>5} {N:>5} x {K:<5} {t_ref * 1e6:>13.0f} {t_f32 * 1e6:>9.0f} "
              f"{t_ref / t_f32:>6.1f}x")
    print("(the reference unpacks the whole weight on every call; it is the specification, "
          "not a fast path)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in FLUX_SHAPES),
                        help="comma-separated OUTxIN shapes (default: FLUX.1-dev linears)")
    parser.add_argument("--m", default="1,16,4096", help="comma-separated batch sizes (GPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    shapes = _shapes(args.shapes)
    storage = storage_table(shapes + [(1000, 412), (512, 64)])
    out = {"benchmark": "bench_ternary", "storage": storage,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "rows": []}
    if torch.cuda.is_available():
        out["rows"] = gpu_bench(shapes, [int(m) for m in args.m.split(",") if m])
    else:
        cpu_bench()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
