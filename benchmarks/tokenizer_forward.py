"""Encode throughput of each tokenizer at its paper size: the compute limit of a tokenize stage's
GPU actor (what one actor can reach once decode and I/O are overlapped; the stage's own ratio
against this limit is benchmarks/tokenize_throughput.py).

    python benchmarks/tokenizer_forward.py --device cuda --batch 64 [--compile] [--json PATH]
    python benchmarks/tokenizer_forward.py --device cpu --batch 8 --specs lfq:tiny:32

Per spec family:size:resolution the model encodes random images with the family's ``encode``
hook exactly as a tokenize stage's actor does (``vgen_core.tokenizers.device_encode``:
``DeviceEncoder.forward`` on inputs already on the device; on CUDA channels-last inputs and weights
under bf16 autocast, fp32 eager on CPU), after warm-up. ``--compile`` adds a compiled run
(``torch.compile(dynamic=False)``, the stage's ``compile: true``); ``--nchw`` an eager run in the
NCHW layout (what channels-last is measured against). Prints images/s, ms per batch and peak GPU
memory per run, the ratio against the fastest run, and each run against eager per spec.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: MaskBit-12bit (LFQ), BAR FSQ, TiTok-BL64 / BL128-VAE, SD-VAE f8c4, MAR KL-16
DEFAULT = ["lfq:maskbit-k12:256", "bar_fsq:bar-fsq-16bits:256", "titok:titok-bl64-vq:256",
           "titok:titok-bl128-vae:256", "kl_vae:sd-vae-f8c4:256", "kl_vae:mar-kl16-f16c16:256"]


def time_encode(enc, x: torch.Tensor, iters: int, warmup: int) -> tuple[float, float]:
    """(seconds per batch, peak GPU GiB) of ``enc.forward(x)`` after ``warmup`` calls."""
    cuda = x.is_cuda
    with torch.inference_mode():
        for _ in range(warmup):
            enc.forward(x, pad_to=x.shape[0])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iters):
            enc.forward(x, pad_to=x.shape[0])
        if cuda:
            torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return dt, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--specs", nargs="+", default=DEFAULT, help="family:size:resolution")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the compiled encode")
    ap.add_argument("--nchw", action="store_true", help="also time eager in the NCHW layout")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU (the stage's rule)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args()
    from vgen_core import families
    from vgen_core.tokenizers.device_encode import DeviceEncoder

    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else \
        ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    modes = ["eager"] + (["compiled"] if args.compile else []) + \
        (["eager-nchw"] if args.nchw and device.type == "cuda" else [])
    rows: list[dict] = []

    def save(rows: list[dict]) -> None:  # after every run: a time cap keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"benchmark": "tokenizer_forward", "device": torch.cuda.get_device_name()
                 if device.type == "cuda" else "cpu", "rows": rows}, indent=1))

    for spec_text in args.specs:
        fam, size, res = spec_text.split(":")
        spec = families.get(fam, role="tokenizer")
        torch.manual_seed(0)
        model = spec.build(size).to(device).eval()
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, int(res), int(res), 3), dtype=torch.uint8,
                               generator=g).to(device)
        for mode in modes:
            enc = DeviceEncoder(model, spec.hook("encode"), families.pixel_range_of(spec),
                                device, precision=precision, compile=mode == "compiled",  # type: ignore[arg-type]
                                channels_last=mode != "eager-nchw")
            if mode == "compiled" and not enc.compiled:
                print(f"{spec_text:<32} compiled: skipped (the encoder compiles on CUDA only)")
                continue
            with torch.inference_mode():
                x = enc.to_device_inputs(images, flip=False)
            dt, mem = time_encode(enc, x, args.iters, args.warmup)
            rows.append({"spec": spec_text, "mode": mode, "precision": precision,
                         "batch": args.batch, "images_per_s": args.batch / dt,
                         "ms_per_batch": dt * 1e3, "peak_gib": mem})
            print(f"{spec_text:<32} {mode:<8} {args.batch / dt:9.1f} images/s  "
                  f"{dt * 1e3:8.2f} ms/batch  peak {mem:5.1f} GiB", flush=True)
            save(rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = max(r["images_per_s"] for r in rows)
    print(f"\n{device.type}, {precision}, batch {args.batch}:")
    for r in rows:
        eager = next(e for e in rows if e["spec"] == r["spec"] and e["mode"] == "eager")
        extra = (f"  {r['mode']}/eager {r['images_per_s'] / eager['images_per_s']:.2f}"
                 if r["mode"] != "eager" else "")
        print(f"{r['spec']:<32} {r['mode']:<8} {r['images_per_s']:9.1f} images/s  "
              f"x fastest {r['images_per_s'] / best:.3f}{extra}")


if __name__ == "__main__":
    main()
