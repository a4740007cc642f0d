"""Encode throughput of each tokenizer at its paper size: the compute limit of a tokenize stage's
GPU actor (what one actor can reach once decode and I/O are overlapped; the stage's own ratio
against this limit is benchmarks/tokenize_throughput.py).

    python benchmarks/tokenizer_forward.py --device cuda --batch 64
    python benchmarks/tokenizer_forward.py --device cpu --batch 8 --specs lfq:tiny:32

Per spec family:size:resolution the model encodes random images (bf16 autocast on CUDA) after
warm-up; prints images/s, ms per batch and peak GPU memory, and the ratio against the fastest.
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT = ["lfq:maskbit-k12:256", "bar_fsq:bar-fsq-16bits:256", "titok:titok-bl64-vq:256",
           "titok:titok-bl128-vae:256", "kl_vae:sd-vae-f8c4:256", "kl_vae:mar-kl16-f16c16:256"]


def encoder(family: str, model):
    if family == "lfq":
        return lambda x: model.encode(x)[2]
    if family == "bar_fsq":
        return lambda x: model.encode(x)[2]
    if family == "titok":
        return lambda x: model.encode(x)[0]
    if family == "kl_vae":
        return model.encode_moments
    raise SystemExit(f"unknown family {family}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--specs", nargs="+", default=DEFAULT, help="family:size:resolution")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    from vgen_core.tokenizers import fsq, kl_vae, lfq, titok

    configs = {"lfq": lfq.lfq_config, "bar_fsq": fsq.bar_fsq_config,
               "titok": titok.titok_config, "kl_vae": kl_vae.kl_vae_config}
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for spec in args.specs:
        fam, size, res = spec.split(":")
        model = configs[fam](size).build().to(device).eval()
        enc = encoder(fam, model)
        x = torch.rand(args.batch, 3, int(res), int(res), device=device)
        if fam != "titok":
            x = x * 2 - 1
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), amp:
            for _ in range(2):
                enc(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                enc(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.iters
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((spec, args.batch / dt, dt * 1e3, mem))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = max(r[1] for r in rows)
    for spec, ips, ms, mem in rows:
        print(f"{spec:<32} {ips:9.1f} images/s  {ms:8.2f} ms/batch  peak {mem:5.1f} GiB  "
              f"x fastest {ips / best:.3f}")


if __name__ == "__main__":
    main()
