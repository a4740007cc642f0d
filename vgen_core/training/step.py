"""How a training step runs fast without changing its maths: the optimizer (fused AdamW on CUDA),
the non-finite-gradient guard, ``torch.compile`` of the model, activation checkpointing of its
transformer blocks and flash-first attention on CUDA.

The train worker (``pipelines.stages.train``) uses them in this order::

    model = task.build(...)
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)                       # before DeepSpeed wraps the model
    opt = make_optimizer(groups, cfg, device)          # fused AdamW on CUDA, as before on CPU
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, ...)
    guard = FiniteGuard(opt, engine.optimizer)         # skips steps with NaN / inf gradients
    if cfg.compile:
        compile_model(engine)                          # static shapes (drop_last batches)
    train_loop(engine, ..., guard=guard)               # flash-first SDPA on CUDA

None of these changes what a step computes (compile only reorders floating-point work), which is
why ``compile`` and ``activation_checkpointing`` are left out of the stage fingerprint
(docs/design.md, "Execution settings are not fingerprinted").
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COMPILE_KWARGS", "FiniteGuard", "attention_backends", "checkpoint_blocks",
           "compile_model", "make_optimizer"]

#: ``torch.compile`` options of a training model: static shapes (the train stage's micro-batches
#: all have ``micro_batch_size`` rows: ``drop_last``), so no dynamic-shape guards or recompiles.
COMPILE_KWARGS: dict[str, Any] = {"dynamic": False}

#: ``nn.ModuleList`` attributes whose elements are the transformer blocks of a model (the
#: families' naming: ``blocks``, ``encoder_blocks``, ``df_blocks``, ``res_blocks``, ``layers``)
_BLOCK_LISTS = ("blocks", "layers")


def make_optimizer(params: Iterable[Any], cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``cfg``'s lr / betas / weight decay; the fused (one-kernel) implementation on
    CUDA, PyTorch's default (foreach) elsewhere, so CPU runs keep their numerics."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


class FiniteGuard:
    """Skips every optimizer step whose gradients hold a NaN or an infinity: weights and optimizer
    state stay exactly as they were, and ``skipped`` counts the skipped steps (a device tensor,
    read when the loop logs).

    The verdict is one scalar per optimizer step, never a scan per parameter:

    * DeepSpeed's ZeRO-1/2/3 and bf16 optimizers compute the global gradient norm (every rank,
      every parameter group) for clipping before they call the optimizer they wrap, and keep it
      as ``_global_grad_norm`` on ``norm_owner`` (``engine.optimizer``); the guard tests that
      scalar. (ZeRO-3 and DeepSpeed's bf16 optimizer also skip on it themselves; ZeRO-1/2 in
      bf16 does not unless ``check_grad_overflow`` is on, which scans each gradient.)
    * Otherwise (ZeRO-0 fp32, a plain optimizer) one ``torch._foreach_norm`` over the gradients
      of the step's parameter groups. Under ZeRO-0 every rank holds the same all-reduced
      gradients, so every rank reaches the same verdict.

    How the step is skipped: a fused AdamW receives the verdict as its ``found_inf`` tensor (the
    kernel then leaves weights, moments and step count unchanged, as it does for GradScaler), so
    a CUDA step has no host synchronisation; any other optimizer needs the verdict on the host
    (one ``.item()`` per step: free on CPU) and sees no gradients for that step.

    A skipped step still counts as a step of the loop (its batch is consumed and the learning
    rate schedule moves on), as DeepSpeed's fp16 overflow skips do.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, norm_owner: Any = None) -> None:
        self.optimizer = optimizer
        self.owner = None if norm_owner is optimizer else norm_owner
        #: steps skipped so far (float tensor on the gradients' device); None before a step
        self.skipped: Tensor | None = None
        self._norm: Any = None  # the owner's norm the last verdict came from
        self._bad: Tensor | None = None
        self._handle = optimizer.register_step_pre_hook(self._before_step)

    def remove(self) -> None:
        """Stop guarding (the optimizer steps unguarded again)."""
        self._handle.remove()
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf

    def skipped_steps(self) -> int:
        """Steps skipped so far (a host sync: call it when logging)."""
        return 0 if self.skipped is None else int(self.skipped.item())

    def verdict(self, optimizer: torch.optim.Optimizer) -> Tensor:
        """A bool scalar tensor: does this optimizer step see a non-finite gradient?"""
        norm = getattr(self.owner, "_global_grad_norm", None) if self.owner is not None else None
        if norm is not None and norm is self._norm and self._bad is not None:
            return self._bad  # the same optimizer step, another parameter group (ZeRO-1/2/3)
        if norm is not None:
            n = torch.as_tensor(norm)
            bad = ~torch.isfinite(n) | (n < 0)  # DeepSpeed marks an invalid group norm -1
        else:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            if not grads:
                return torch.zeros((), dtype=torch.bool)
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # fp16 norms overflow
            bad = ~torch.isfinite(torch.stack(norms)).all()
        bad = bad.reshape(())
        self._norm, self._bad = norm, bad
        self.skipped = bad.float() if self.skipped is None else self.skipped + bad
        return bad

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        bad = self.verdict(optimizer)
        if any(g.get("fused") for g in optimizer.param_groups):
            optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
        elif bool(bad):  # host sync: non-fused optimizers cannot take the verdict as a tensor
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # sampling, evaluation: nothing to save or recompute
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, block) of every transformer block: the elements of ``nn.ModuleList`` attributes
    named ``*blocks`` / ``*layers`` (outermost first; blocks inside a block are not listed, nor
    those of a module that checkpoints its own, e.g. DiMR's ``grad_checkpointing``)."""
    taken: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, "checkpointing", False) is True:
            taken.append(name)
            continue
        if not isinstance(module, nn.ModuleList) or not name.split(".")[-1].endswith(_BLOCK_LISTS):
            continue
        for i, block in enumerate(module):
            full = f"{name}.{i}"
            if isinstance(block, nn.Linear) or any(full.startswith(f"{t}.") or not t
                                                   for t in taken):
                continue
            taken.append(full)
            yield full, block


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Activation checkpointing over ``model``'s transformer blocks (non-reentrant
    ``torch.utils.checkpoint``): each block keeps only its inputs during the forward and
    recomputes its activations in the backward, with the same RNG state (dropout masks), so
    gradients are the same as without. The blocks' ``forward`` is wrapped in place: parameter
    names, state dicts and checkpoints do not change. Returns the wrapped blocks' names."""
    names = []
    for name, block in list(_blocks(model)):
        if getattr(block.forward, "_vgen_checkpointed", False):
            continue
        wrapped = functools.partial(_checkpointed, block.forward)
        wrapped._vgen_checkpointed = True  # type: ignore[attr-defined]
        block.forward = wrapped
        names.append(name)
    return names


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` ``model``'s forward in place (static shapes; :data:`COMPILE_KWARGS`
    updated with ``options``). A DeepSpeed engine compiles its module through
    ``engine.compile``; a plain module through ``nn.Module.compile``. Parameter names and state
    dicts are unchanged (no ``_orig_mod.`` prefix), so checkpoints and exports are the same."""
    kwargs = {**COMPILE_KWARGS, **options}
    ds = sys.modules.get("deepspeed.runtime.engine")
    if ds is not None and isinstance(model, ds.DeepSpeedEngine):
        model.compile(compile_kwargs=kwargs)
    else:
        model.compile(**kwargs)
    return model


@contextlib.contextmanager
def attention_backends(device: torch.device) -> Iterator[None]:
    """On CUDA: ``F.scaled_dot_product_attention`` tries FlashAttention first, then
    memory-efficient, cuDNN and math attention (the backends that cannot take a call are
    skipped: flash needs fp16 / bf16, no ``attn_mask``, head width <= 256). Elsewhere: nothing."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield
