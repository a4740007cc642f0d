"""Model FLOPs utilisation of the generators' training step at a given size (plain PyTorch step,
the compute inside one Ray Train worker; the stage's own overhead is benchmarks/train_overhead.py).

    python benchmarks/generator_mfu.py --device cuda --models maskgit:B rar:B maskbit:L \
        --batch 64 --peak-tflops 989      # H100 SXM dense bf16
    python benchmarks/generator_mfu.py --device cpu --models maskgit:tiny --batch 8

Per model: build at the size, bf16 autocast on CUDA (fp32 on CPU), AdamW, a few warm-up steps,
then timed optimizer steps with synchronisation. Training FLOPs per step = 6 x (parameters that
see every token) x tokens per step (+ the attention score/value products, 12 x layers x width x
sequence^2 per sample), the convention of the PaLM/MFU papers. MFU = achieved FLOP/s / peak.
Prints one line per model and the ratio achieved/peak.
"""

from __future__ import annotations

import argparse
import time

import torch


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["maskgit:B", "rar:B"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the device (H100 SXM 989, H200 989)")
    args = ap.parse_args()
    from vgen_core.training.tasks import get_task

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    for spec in args.models:
        family, size = spec.split(":")
        task = get_task(family)
        torch.manual_seed(0)
        model = task.build(size, {}, {}).to(device).train()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        batch, seq = make_batch(task, model, args.batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)

        def step(i: int, task=task, model=model, opt=opt, batch=batch, amp=amp) -> float:
            with amp:
                loss, _ = task.loss(model, batch, i)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        for i in range(args.warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(args.steps):
            last = step(args.warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        flops = (6.0 * (params - emb) * args.batch * seq
                 + 3 * attention_flops(model, seq) * args.batch)
        achieved = flops / dt / 1e12
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{spec:<14} params {params / 1e6:7.1f}M  batch {args.batch} x {seq} tokens  "
              f"{1 / dt:6.2f} steps/s  {args.batch * seq / dt:10.0f} tokens/s  "
              f"{achieved:7.1f} TFLOP/s  MFU {achieved / args.peak_tflops:.3f}  "
              f"peak mem {mem:.1f} GiB  loss {last:.3f}")
        del model, opt, step  # free this model's memory before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
