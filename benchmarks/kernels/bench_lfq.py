"""Benchmark the fused LFQ kernel against its PyTorch reference on the same inputs, same run.

    PYTHONPATH=. python benchmarks/kernels/bench_lfq.py [--iters 50] [--peak-tbs 3.35] [--json PATH]

On a CUDA GPU: forward, forward+backward and unpack at a MaskBit training size and at large
sizes; prints reference and Triton times, their ratio, and the Triton kernel's achieved bandwidth
(minimal bytes moved, kernels/lfq/README.md) as a fraction of the device's peak DRAM bandwidth.
Without a GPU it says so, times the reference at the MaskBit size, and runs the Triton path in the
interpreter (TRITON_INTERPRET=1) at a tiny size, which only shows the code path runs.
``--json PATH`` writes every row (times, ratio, GB/s, fraction of peak) for benchmarks/gpu_suite.py.

Shape legend: B batch, N tokens per sample, K bits per token, P = ceil(K / 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.lfq import reference  # noqa: E402

# Peak DRAM bandwidth in TB/s from NVIDIA's product datasheets (first match on the device name
# wins, so the more specific names come first).
PEAK_TBS = [
    ("H200", 4.8, "H200 SXM datasheet, HBM3e"),
    ("H100 NVL", 3.9, "H100 NVL datasheet"),
    ("H100 PCIe", 2.0, "H100 PCIe datasheet"),
    ("H100", 3.35, "H100 SXM5 datasheet, HBM3"),
    ("A100-SXM4-80GB", 2.039, "A100 80GB SXM datasheet"),
    ("A100 80GB PCIe", 1.935, "A100 80GB PCIe datasheet"),
    ("A100", 1.555, "A100 40GB datasheet"),
    ("L40", 0.864, "L40 / L40S datasheet"),
    ("A10G", 0.6, "A10G (AWS) datasheet"),
    ("RTX 4090", 1.008, "GeForce RTX 4090 spec"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def peak_bandwidth(name: str, override_tbs: float | None) -> tuple[float | None, str]:
    """(bytes/s, where the number comes from) for the named device, None if unknown."""
    if override_tbs:
        return override_tbs * 1e12, "--peak-tbs"
    for key, tbs, source in PEAK_TBS:
        if key.lower() in name.lower():
            return tbs * 1e12, f"{source} ({tbs} TB/s, table in {Path(__file__).name})"
    return None, "unknown device: pass --peak-tbs"


def bytes_moved(op: str, B: int, N: int, K: int, dtype: torch.dtype) -> int:
    """Minimal DRAM traffic of the fused kernels (README 'Bytes moved')."""
    s, P, E = torch.finfo(dtype).bits // 8, (K + 7) // 8, B * N * K
    fwd = E * (2 * s + 4) + B * N * (8 + P)
    if op == "fwd":
        return fwd
    if op == "fwd+bwd":
        return fwd + E * (3 * s + 4)
    return B * N * P + E * s  # unpack


def time_ms(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds per call after warm-up (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if HAS_CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_ops(impl, B: int, N: int, K: int, dtype: torch.dtype, device: str, T: float):
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(B, N, K, device=device, dtype=dtype, generator=g)
    zg = z.clone().requires_grad_(True)
    gs = torch.randn(B, N, K, device=device, dtype=dtype, generator=g)
    gp = torch.randn(B, N, K, device=device, dtype=torch.float32, generator=g)
    packed = reference.lfq_quantize(z, T).packed

    def fwd_bwd():
        out = impl.lfq_quantize(zg, T)
        torch.autograd.backward([out.signs, out.bit_probs], [gs, gp])
        zg.grad = None

    return {
        "fwd": lambda: impl.lfq_quantize(z, T),
        "fwd+bwd": fwd_bwd,
        "unpack": lambda: impl.unpack_to_signs(packed, K, dtype),
    }


def run(sizes, iters: int, peak: float | None, device: str, T: float) -> list[dict]:
    from kernels.lfq import triton as triton_impl

    rows: list[dict] = []
    bw_head = f" {'Triton GB/s':>11} {'% peak':>7}" if device == "cuda" else ""
    print(f"{'op':<8} {'B':>5} {'N':>5} {'K':>3} {'dtype':<5} {'ref ms':>9} {'triton ms':>10} "
          f"{'ref/triton':>10}{bw_head}")
    for B, N, K, dname in sizes:
        dtype = DTYPES[dname]
        ref_ops = make_ops(reference, B, N, K, dtype, device, T)
        tri_ops = make_ops(triton_impl, B, N, K, dtype, device, T)
        for op in ("fwd", "fwd+bwd", "unpack"):
            t_ref, t_tri = time_ms(ref_ops[op], iters), time_ms(tri_ops[op], iters)
            line = (f"{op:<8} {B:>5} {N:>5} {K:>3} {dname:<5} {t_ref:>9.4f} {t_tri:>10.4f} "
                    f"{t_ref / t_tri:>9.2f}x")
            row = {"op": op, "B": B, "N": N, "K": K, "dtype": dname, "device": device,
                   "ref_ms": t_ref, "triton_ms": t_tri, "speedup": t_ref / t_tri,
                   "gbs": None, "peak_frac": None}
            if device == "cuda":
                gbs = bytes_moved(op, B, N, K, dtype) / (t_tri * 1e-3) / 1e9
                pct = f"{100 * gbs * 1e9 / peak:>6.1f}%" if peak else f"{'n/a':>7}"
                line += f" {gbs:>11.1f} {pct}"
                row.update(gbs=gbs, peak_frac=gbs * 1e9 / peak if peak else None)
            print(line, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.01)
    ap.add_argument("--peak-tbs", type=float, default=None, help="override the peak, in TB/s")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    out: dict = {"benchmark": "bench_lfq", "device": "cpu", "peak_Bps": None, "rows": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    if HAS_CUDA:
        name = torch.cuda.get_device_name()
        peak, source = peak_bandwidth(name, args.peak_tbs)
        print(f"device: {name}; peak DRAM bandwidth from {source}")
        out.update(device=name, peak_Bps=peak)
        sizes = [(16, 256, 12, "fp32"),  # one MaskBit step per GPU: launch-bound, not bandwidth
                 (1024, 1024, 12, "fp32"), (1024, 1024, 16, "bf16"), (512, 1024, 32, "fp16")]
        out["rows"] = run(sizes, args.iters, peak, "cuda", args.temperature)
        save()
        return
    print("NOTE: no CUDA GPU present. Timing the PyTorch reference on CPU at the MaskBit size, and"
          "\n      the Triton kernels in the interpreter (TRITON_INTERPRET=1) at a tiny size: the"
          "\n      interpreter runs them in numpy, so its times say nothing about GPU speed and"
          "\n      there is no bandwidth figure. Run this on a GPU for the real comparison.")
    torch.set_num_threads(1)  # steadier on a shared machine; these are not headline numbers
    print("\nreference only, CPU, 1 thread:")
    print(f"{'op':<8} {'B':>5} {'N':>5} {'K':>3} {'dtype':<5} {'ref ms':>9}")
    for B, N, K, dname in [(16, 256, 12, "fp32"), (16, 256, 12, "bf16")]:
        ops = make_ops(reference, B, N, K, DTYPES[dname], "cpu", args.temperature)
        for op in ("fwd", "fwd+bwd", "unpack"):
            print(f"{op:<8} {B:>5} {N:>5} {K:>3} {dname:<5} {time_ms(ops[op], args.iters):>9.4f}")
    print("\nreference vs Triton interpreter, CPU (tiny):")
    out["rows"] = run([(2, 64, 12, "fp32")], min(args.iters, 5), None, "cpu", args.temperature)
    save()


if __name__ == "__main__":
    main()
