"""1.58-bit generator: weight bytes, model bytes and sampling speed of a ternary generator against
its full-precision baseline, measured in the same run.

    .venv/bin/python benchmarks/ternary_generator.py [--family maskgit] [--size B] [--samples 4]

The model is built at the released size with a seeded random init (the byte counts do not depend
on the values; the speed does not either); the ternary copy is the one ``quantize.ternary``
exports (``vgen_core.training.ternary``: QAT layers packed into ``kernels.ternary.TernaryLinear``,
the layers of ``DEFAULT_KEEP`` in full precision), without the distillation steps. Sampling uses
the family's released settings for the size, with ``--steps`` overriding the step count. On CPU
the ternary matmul is the PyTorch reference (it unpacks the weight at every call), so the CPU
speed ratio is a lower bound; on CUDA the Triton kernel runs. Ratios: ternary / fp.
"""

from __future__ import annotations

import argparse
import time

import torch


def _rate(spec, model, labels, steps: int | None, options: dict) -> tuple[float, float | None]:
    device = labels.device
    kw = {**options, **({"steps": steps} if steps else {})}
    g = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():  # warm-up (kernel compilation, allocator)
        spec.sampler(model, labels[:1], generator=g, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        spec.sampler(model, labels, generator=g, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return len(labels) / dt, peak


def main() -> None:
    from vgen_core import families
    from vgen_core.training.ternary import model_bytes, pack_student, to_qat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="maskgit")
    ap.add_argument("--size", default="B")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    spec = families.get(args.family)
    torch.manual_seed(0)
    fp = spec.build(args.size).eval().to(device)
    student = spec.build(args.size).eval().to(device)
    student.load_state_dict(fp.state_dict())
    converted, kept = to_qat(student)
    packed, report = pack_student(student)
    classes = max(int(getattr(fp.config, "num_classes", 1) or 1), 1)
    labels = torch.arange(args.samples, device=device) % classes
    options = dict(spec.sampling.get(args.size, {}))
    fp_rate, fp_peak = _rate(spec, fp, labels, args.steps, options)
    q_rate, q_peak = _rate(spec, packed, labels, args.steps, options)
    print(f"{spec.name} / {args.size} on {device}: {len(converted)} linears ternary, "
          f"{len(kept)} kept")
    print(f"converted weights: fp32 {report.bytes_before:,} B, bf16 {report.bf16_bytes:,} B, "
          f"packed {report.bytes_after:,} B = 1/{report.bf16_bytes / report.bytes_after:.2f} "
          "of bf16")
    print(f"model bytes: fp {model_bytes(fp):,} -> ternary {model_bytes(packed):,} "
          f"(ratio {model_bytes(packed) / model_bytes(fp):.3f})")
    print(f"sampling: fp {fp_rate:.3f} samples/s, ternary {q_rate:.3f} samples/s "
          f"(ratio {q_rate / fp_rate:.2f})")
    if fp_peak is not None and q_peak is not None:
        print(f"peak memory while sampling: fp {fp_peak:,} B, ternary {q_peak:,} B "
              f"(ratio {q_peak / fp_peak:.3f})")


if __name__ == "__main__":
    main()
