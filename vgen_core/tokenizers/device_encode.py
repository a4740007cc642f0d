"""Encoding uint8 image batches with a tokenizer family's ``encode`` hook on one device: what a
tokenize / cache stage's actor runs (``pipelines/stages/tokenize.py``) and what the benchmarks
time as "encode alone".

Shape legend: B images, H/W pixels, C = 3 channels, V views per image (1, or 2 with the flip).

**CPU** (the reference path): each view (the crops, then their horizontal flips) is converted with
``families.to_model_pixels`` and encoded in one call (``cpu_encode``: the stage's ``encode``),
fp32, eager: exactly what the stages always did. ``micro_batch`` splits a view into chunks and
``precision="bf16"`` wraps the calls in CPU autocast, when asked; ``compile`` applies on CUDA only.

**CUDA**, per batch:

* the images are copied in chunks of ``micro_batch // V`` into a pinned host buffer (allocated
  once, grown when needed) and sent to the GPU with ``non_blocking`` copies on a side stream;
  chunk i+1's memcpy and host-to-device copy run while chunk i is encoded;
* on the GPU: pixel-range conversion, the flip (``x.flip(-1)``: no second upload), channels-last
  layout, crops and flips concatenated into one forward of ``V x`` images;
* ``precision="bf16"``: the forward runs under ``torch.autocast("cuda", torch.bfloat16)``;
  ``compile=True``: ``torch.compile(dynamic=False)`` of the encode hook (the last chunk is padded
  to the chunk size so one graph serves every call);
* outputs go back with ``non_blocking`` device-to-host copies (into pinned memory) and the batch
  synchronises once, at its end.

bf16 changes results (token bits near 0 flip, latents differ in their low bits), so the stages put
the precision into their row fingerprint; channels-last, compile, chunking and the copies change
nothing but float summation order, like the device or the batch size, and stay out of it.

**Automatic micro-batch** (``micro_batch="auto"``, CUDA): the encode's peak activation memory is
measured at two probe batches (``probe_footprint``: peak of ``max_memory_allocated`` above the
allocation before the call, at ``PROBE_BATCHES``, each after one unmeasured call that lets cudnn
pick its algorithms), giving a fixed part and a per-input slope;
:func:`auto_micro_batch` then takes ``fraction`` of the memory PyTorch can still use
(``torch.cuda.mem_get_info`` free bytes + the allocator's reserved-but-unused bytes), times the
actor's share of the GPU, minus the fixed part, divided by the slope, rounded down to a multiple
of 8 and capped at ``AUTO_CAP``. On CPU ``auto`` means the whole batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from vgen_core import families

__all__ = ["AUTO_CAP", "AUTO_FRACTION", "PROBE_BATCHES", "DeviceEncoder", "auto_micro_batch"]

log = logging.getLogger(__name__)

#: largest automatic micro-batch (model inputs per forward): past it throughput stops growing
#: and one batch's latency only delays the commits
AUTO_CAP = 1024
#: share of the usable GPU memory the automatic micro-batch may fill (the rest: allocator
#: fragmentation, compile workspaces, the next batch's upload)
AUTO_FRACTION = 0.7
#: probe batch sizes of the footprint measurement (two points: fixed part + per-image slope)
PROBE_BATCHES = (2, 8)

Precision = Literal["fp32", "bf16"]


def auto_micro_batch(usable_bytes: int, fixed_bytes: int, per_input_bytes: int, *,
                     fraction: float = AUTO_FRACTION, share: float = 1.0,
                     cap: int = AUTO_CAP) -> int:
    """Model inputs per forward that fit: ``(fraction * share * usable - fixed) / per_input``,
    rounded down to a multiple of 8 when >= 8, at least 1, at most ``cap``.

    ``usable_bytes``: memory PyTorch can still allocate; ``share``: the actor's fraction of the
    GPU (``resources.gpus`` below 1 when actors share one); ``fixed_bytes`` / ``per_input_bytes``:
    the measured footprint (:meth:`DeviceEncoder.probe_footprint`).
    """
    budget = fraction * min(1.0, max(share, 0.0)) * usable_bytes - max(fixed_bytes, 0)
    n = int(budget // max(per_input_bytes, 1))
    if n >= 8:
        n -= n % 8
    return max(1, min(cap, n))


class DeviceEncoder:
    """``encode_views(images_BHWC, flip)`` with a family's encode hook on one device (see the
    module docstring). ``micro_batch``: model inputs per forward (None: everything at once;
    ``"auto"``: from GPU memory); ``precision``: ``"fp32"`` or ``"bf16"`` (autocast);
    ``channels_last``: the CUDA layout of inputs and weights (False: NCHW, for comparisons)."""

    def __init__(self, model: torch.nn.Module, encode_fn: Callable[..., dict[str, Tensor]],
                 pixel_range: str, device: torch.device | str, *, precision: Precision = "fp32",
                 compile: bool = False, micro_batch: int | Literal["auto"] | None = None,
                 gpu_share: float = 1.0, channels_last: bool = True,
                 cpu_encode: Callable[[Tensor], dict[str, np.ndarray]] | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r} is not one of fp32, bf16")
        self.model, self.encode_fn, self.pixel_range = model, encode_fn, pixel_range
        self.device, self.precision, self.gpu_share = torch.device(device), precision, gpu_share
        self.cuda = self.device.type == "cuda"
        self.micro_batch: int | Literal["auto"] | None = micro_batch
        self._fn: Callable[[Tensor], dict[str, Tensor]] = lambda x: self.encode_fn(self.model, x)
        self._cpu_encode = cpu_encode or (lambda x: self._to_numpy(self._fn(x)))
        self.compiled = compile and self.cuda
        self.channels_last = channels_last and self.cuda
        self._pinned: Tensor | None = None
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            self.model.to(memory_format=layout)  # type: ignore[call-overload]
            self._copy_stream = torch.cuda.Stream(self.device)
        if self.compiled:
            self._fn = torch.compile(self._fn, dynamic=False)

    # -- settings -------------------------------------------------------------------------
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def resolve_micro_batch(self, resolution: int) -> int | None:
        """The micro-batch as a number (``auto`` probed once on CUDA; None: whole batches)."""
        if self.micro_batch != "auto":
            return self.micro_batch
        if not self.cuda:
            self.micro_batch = None
            return None
        fixed, per = self.probe_footprint(resolution)
        free, _ = torch.cuda.mem_get_info(self.device)
        usable = free + torch.cuda.memory_reserved(self.device) \
            - torch.cuda.memory_allocated(self.device)
        n = auto_micro_batch(usable, fixed, per, share=self.gpu_share)
        log.info("encode micro-batch %d: %.1f MiB per input + %.1f MiB fixed, %.1f GiB usable, "
                 "GPU share %.2f", n, per / 2**20, fixed / 2**20, usable / 2**30, self.gpu_share)
        self.micro_batch = n
        return n

    def probe_footprint(self, resolution: int,
                        sizes: Sequence[int] = PROBE_BATCHES) -> tuple[int, int]:
        """(fixed bytes, bytes per model input) of one eager encode at ``resolution``, from the
        peak allocation at two batch sizes (CUDA only)."""
        peaks = []
        for n in sizes:
            x = torch.zeros(n, 3, resolution, resolution, device=self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self._autocast():
                self.encode_fn(self.model, x)  # cudnn's algorithm search (its workspaces) first
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self.encode_fn(self.model, x)
                torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            del x
        (n0, n1), (p0, p1) = sizes[:2], peaks[:2]
        per = max(1, (p1 - p0) // max(n1 - n0, 1))
        return max(0, p0 - n0 * per), per

    # -- encoding -------------------------------------------------------------------------
    def encode_views(self, images_BHWC: np.ndarray, flip: bool) -> list[dict[str, np.ndarray]]:
        """uint8 (B, H, W, 3) images -> [outputs of the crops, outputs of their flips (when
        ``flip``)], each a dict of numpy arrays with B first (floats as float32)."""
        if not len(images_BHWC):
            raise ValueError("encode_views: no images (the stage returns before encoding an "
                             "empty batch)")
        if self.cuda:
            return self._encode_cuda(images_BHWC, flip)
        return self._encode_cpu(images_BHWC, flip)

    def _encode_cpu(self, images_BHWC: np.ndarray, flip: bool) -> list[dict[str, np.ndarray]]:
        if not images_BHWC.flags.writeable:  # a view of an Arrow buffer: torch wants to own it
            images_BHWC = images_BHWC.copy()
        views = [images_BHWC] + ([images_BHWC[:, :, ::-1].copy()] if flip else [])
        step = self.resolve_micro_batch(images_BHWC.shape[1]) or len(images_BHWC)
        outs = []
        with torch.inference_mode(), self._autocast():
            for v in views:
                parts = [self._cpu_encode(families.to_model_pixels(
                    torch.from_numpy(v[i:i + step]).to(self.device), self.pixel_range))
                    for i in range(0, len(v), step)]
                outs.append(parts[0] if len(parts) == 1 else
                            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return outs

    @staticmethod
    def _to_numpy(out: dict[str, Tensor]) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                for k, v in out.items()}

    def _pinned_buffer(self, shape: tuple[int, ...]) -> Tensor:
        n = int(np.prod(shape))
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        return self._pinned[:n].view(shape)

    def _upload(self, host: Tensor, images: np.ndarray) -> tuple[Tensor, torch.cuda.Event]:
        """memcpy ``images`` into pinned ``host``, then an async copy to the GPU on the side
        stream; returns the device tensor and the event that marks its arrival."""
        host.numpy()[...] = images
        with torch.cuda.stream(self._copy_stream):
            dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return dev, done

    def to_device_inputs(self, images_u8: Tensor, flip: bool) -> Tensor:
        """uint8 (m, H, W, 3) on the device -> (V m, 3, H, W) model pixels (crops, then flips),
        channels-last on CUDA."""
        x = families.to_model_pixels(images_u8, self.pixel_range)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: Tensor, pad_to: int | None = None) -> dict[str, Tensor]:
        """The encode hook on model inputs already on the device (settings applied); with
        ``pad_to`` (compiled: one static shape) the batch is zero-padded and the outputs cut."""
        n = x.shape[0]
        if self.compiled and pad_to is not None and n < pad_to:
            pad = x.new_zeros((pad_to - n, *x.shape[1:]))
            x = torch.cat([x, pad])
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with self._autocast():
            out = self._fn(x)
        return {k: v[:n] for k, v in out.items()} if x.shape[0] != n else out

    def _encode_cuda(self, images_BHWC: np.ndarray, flip: bool) -> list[dict[str, np.ndarray]]:
        B, V = len(images_BHWC), 2 if flip else 1
        step = self.resolve_micro_batch(images_BHWC.shape[1])
        per_chunk = max(1, (step or B * V) // V)  # images per forward
        bounds = [(i, min(i + per_chunk, B)) for i in range(0, B, per_chunk)]
        host = self._pinned_buffer(tuple(images_BHWC.shape))
        compute = torch.cuda.current_stream(self.device)
        chunks: list[tuple[int, dict[str, Tensor]]] = []
        with torch.inference_mode():
            nxt = self._upload(host[bounds[0][0]:bounds[0][1]],
                               images_BHWC[bounds[0][0]:bounds[0][1]])
            for ci, (i0, i1) in enumerate(bounds):
                dev, arrived = nxt
                compute.wait_event(arrived)
                dev.record_stream(compute)
                out = self.forward(self.to_device_inputs(dev, flip), pad_to=per_chunk * V)
                chunks.append((i1 - i0, {k: (v.float() if v.is_floating_point() else v)
                                         .to("cpu", non_blocking=True) for k, v in out.items()}))
                if ci + 1 < len(bounds):  # the next chunk's memcpy + upload overlap this compute
                    j0, j1 = bounds[ci + 1]
                    nxt = self._upload(host[j0:j1], images_BHWC[j0:j1])
        finished = torch.cuda.Event()
        finished.record(compute)
        finished.synchronize()
        views = []
        for view in range(V):
            views.append({k: torch.cat([o[k][view * m:(view + 1) * m] for m, o in chunks]).numpy()
                          for k in chunks[0][1]})
        return views
