"""LFQ kernel: Triton vs reference (outputs and gradients), reference vs the LFQ tokenizer maths.

The Triton comparisons run on CPU through ``TRITON_INTERPRET=1`` in one child process (this file
run as a script), because the interpreter switch is read when a kernel is defined and must not
leak into the rest of the test session. Inputs are made here, the child runs the Triton path on
them, and each parametrized test compares one case against the reference computed here.
GPU tests (marker ``gpu``) run the compiled kernels in-process at realistic sizes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as the interpreter child
    sys.path.insert(0, str(ROOT))

import kernels.lfq as lfq  # noqa: E402
from kernels.lfq import reference as ref  # noqa: E402

# Gradients: Triton sums both terms in fp32 and rounds once; the reference rounds the probability
# term to z's dtype before adding, so they may differ by about one ulp of the result. The
# probability term is fp32 in both (also for fp64 inputs), hence fp64's fp32-like tolerance.
GRAD_TOL = {  # dtype: (rtol, atol)
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# On a GPU, tl.exp compiles to the hardware exp2 approximation (a few ulp), which the fp32
# gradient (a difference of two such terms, scaled by 1/T) amplifies relative to small results:
# measured on an H100, max |diff| 2.4e-6 (relative 3.3e-4 at near-zero entries) at T=0.5 and one
# element of 49k off by 3.2e-5 at T=0.01. The absolute tolerance scales with 1/T.
GRAD_TOL_GPU = {**GRAD_TOL, torch.float32: (5e-4, 1e-5), torch.float64: (5e-4, 1e-5)}
PROB_TOL = (1e-5, 1e-6)  # bit_probs are fp32 sigmoid of the exactly upcast z, for every dtype
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    B: int
    N: int
    K: int
    dtype: torch.dtype = torch.float32
    temperature: float = 0.5
    grads: str = "both"  # upstream gradient on: signs, probs, both, or "sum" (expanded grads)
    layout: str = "contiguous"  # or "strided": (B, K, N) seen as (B, N, K), like encoder output;
    #                             or "sliced": z[:, 1:N+1] of a (B, N+3, K) tensor

    @property
    def id(self) -> str:
        s = f"B{self.B}-N{self.N}-K{self.K}-{DTYPE_NAMES[self.dtype]}"
        if self.temperature != 0.5:
            s += f"-T{self.temperature:g}"
        if self.grads != "both":
            s += f"-grad_{self.grads}"
        return s + ("" if self.layout == "contiguous" else f"-{self.layout}")


CASES = [
    Case(1, 1, 1),
    Case(3, 63, 17),
    Case(3, 63, 17, torch.float16),
    Case(3, 63, 17, torch.bfloat16),
    Case(3, 63, 17, torch.float64),
    Case(2, 37, 5, torch.float16),
    Case(2, 45, 8, torch.bfloat16),
    Case(1, 33, 9),
    Case(2, 300, 32),  # 600 rows: 5 programs of 128 rows, the last one partial
    Case(2, 300, 32, torch.bfloat16, temperature=0.01),
    Case(2, 70, 12, torch.float16, grads="signs"),
    Case(2, 70, 12, grads="probs"),
    Case(2, 70, 12, torch.bfloat16, grads="sum"),
    Case(2, 50, 10, layout="strided"),
    Case(2, 300, 32, torch.bfloat16, layout="strided"),  # 3 blocks per sample, last partial
    Case(3, 130, 7, torch.float16, layout="sliced"),
]
UNPACK_CASES = [(1, 1, 1, torch.float32), (3, 63, 17, torch.float32), (2, 40, 8, torch.bfloat16),
                (2, 300, 32, torch.float16), (1, 10, 3, torch.float64)]


def _unpack_id(c: tuple) -> str:
    B, N, K, dtype = c
    return f"B{B}-N{N}-K{K}-{DTYPE_NAMES[dtype]}"


def _case_inputs(case: Case, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, N, K = case.B, case.N, case.K
    shape = {"contiguous": (B, N, K), "strided": (B, K, N), "sliced": (B, N + 3, K)}[case.layout]
    z = torch.randn(shape, generator=g).to(case.dtype)
    z.view(-1)[:2] = torch.tensor([0.0, -0.0])[: z.numel()]  # sign(+-0) = -1, bit 0
    gs = torch.randn(B, N, K, generator=g).to(case.dtype)
    gp = torch.randn(B, N, K, generator=g)
    gs, gp = (gs if case.grads in ("signs", "both") else None,
              gp if case.grads in ("probs", "both") else None)
    return {"z": z, "gs": gs, "gp": gp, "T": case.temperature, "layout": case.layout}


def _view(z: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "strided":
        return z.transpose(1, 2)
    return z[:, 1:-2] if layout == "sliced" else z


def _run(impl, inp: dict) -> dict:
    """Forward + backward of one implementation on one case's inputs."""
    z = inp["z"].clone().requires_grad_(True)
    out = impl.lfq_quantize(_view(z, inp["layout"]), inp["T"])
    if inp["gs"] is None and inp["gp"] is None:  # "sum": autograd hands in expanded gradients
        (grad,) = torch.autograd.grad(out.signs.float().sum() + out.bit_probs.sum(), z)
    else:
        pairs = [(o, g) for o, g in ((out.signs, inp["gs"]), (out.bit_probs, inp["gp"]))
                 if g is not None]
        (grad,) = torch.autograd.grad([o for o, _ in pairs], z, [g for _, g in pairs])
    return {"signs": out.signs.detach(), "indices": out.indices, "packed": out.packed,
            "bit_probs": out.bit_probs.detach(), "grad": grad,
            "signs_stride": out.signs.stride(), "probs_stride": out.bit_probs.stride()}


def _unpack_inputs(c: tuple, seed: int) -> torch.Tensor:
    B, N, K, _ = c
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, N, (K + 7) // 8), generator=g, dtype=torch.uint8)  # junk


def _child(in_path: str, out_path: str) -> None:
    """Interpreter child: run the Triton path on every saved case (TRITON_INTERPRET=1 is set)."""
    from kernels.lfq import triton as tk

    inputs = torch.load(in_path)
    results = {"backend": lfq._backend(torch.zeros(1)).__name__, "cases": {}, "unpack": {}}
    for cid, inp in inputs["cases"].items():
        results["cases"][cid] = _run(tk, inp)
    for cid, (packed, K, dtype) in inputs["unpack"].items():
        results["unpack"][cid] = tk.unpack_to_signs(packed, K, dtype)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    """Inputs and the child's Triton-interpreter results for every case."""
    d = tmp_path_factory.mktemp("lfq_interp")
    inputs = {
        "cases": {c.id: _case_inputs(c, seed=i) for i, c in enumerate(CASES)},
        "unpack": {_unpack_id(c): (_unpack_inputs(c, seed=100 + i), c[2], c[3])
                   for i, c in enumerate(UNPACK_CASES)},
    }
    torch.save(inputs, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", VGEN_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(d / "in.pt"), str(d / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"Triton interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {"inputs": inputs, "results": torch.load(d / "out.pt")}


def _assert_matches_reference(got: dict, inp: dict, dtype: torch.dtype, gpu: bool = False,
                              temperature: float = 0.5) -> None:
    want = _run(ref, inp)
    assert torch.equal(got["signs"], want["signs"]) and got["signs"].dtype == dtype
    assert torch.equal(got["indices"], want["indices"])
    assert torch.equal(got["packed"], want["packed"])
    torch.testing.assert_close(got["bit_probs"], want["bit_probs"], rtol=PROB_TOL[0],
                               atol=PROB_TOL[1])
    rtol, atol = (GRAD_TOL_GPU if gpu else GRAD_TOL)[dtype]
    if gpu:
        atol *= max(1.0, 0.1 / temperature)
    torch.testing.assert_close(got["grad"], want["grad"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_interpreter_matches_reference(interp, case: Case):
    got = interp["results"]["cases"][case.id]
    _assert_matches_reference(got, interp["inputs"]["cases"][case.id], case.dtype)
    if case.layout == "strided":  # signs and probs come back in z's (B, K, N) layout
        assert got["signs_stride"] == (case.K * case.N, 1, case.N)
        assert got["probs_stride"] == (case.K * case.N, 1, case.N)


@pytest.mark.parametrize("c", UNPACK_CASES, ids=[_unpack_id(c) for c in UNPACK_CASES])
def test_triton_interpreter_unpack_matches_reference(interp, c):
    packed, K, dtype = interp["inputs"]["unpack"][_unpack_id(c)]
    got = interp["results"]["unpack"][_unpack_id(c)]
    assert got.dtype == dtype
    assert torch.equal(got, ref.unpack_to_signs(packed, K, dtype))


def test_vgen_kernels_triton_forces_triton_in_child(interp):
    assert interp["results"]["backend"] == "kernels.lfq.triton"


# --------------------------------------------------------------------------------------------------
# Reference: the maths, and the bit conventions that vgen_core/tokenizers/lfq.py imports from here
# --------------------------------------------------------------------------------------------------


def test_bit_probs_are_the_marginals_of_the_code_softmax():
    """softmax_c(2 z.c / T) over the explicit {-1,+1}^K codebook has P(c_k = +1) = sigmoid(4z/T)."""
    K, T = 5, 0.7
    z_BNK = torch.randn(2, 9, K, dtype=torch.float64)
    codes01_VK = ((torch.arange(2**K)[:, None] >> torch.arange(K)) & 1).double()
    p_BNV = torch.softmax(2.0 * z_BNK @ (2 * codes01_VK - 1).T / T, dim=-1)
    marginal_BNK = p_BNV @ codes01_VK
    torch.testing.assert_close(ref.lfq_quantize(z_BNK, T).bit_probs.double(), marginal_BNK,
                               rtol=1e-6, atol=1e-7)


def test_reference_agrees_with_lfq_tokenizer():
    from vgen_core.tokenizers.lfq import (
        LookupFreeQuantizer,
        bits_to_indices,
        pack_bits,
        per_sample_entropy,
    )

    B, K, h, w, T = 2, 13, 3, 5, 0.3
    z_BKhw = torch.randn(B, K, h, w)
    q_BKhw, bits_BhwK, idx_Bhw, _ = LookupFreeQuantizer(K).eval()(z_BKhw)
    out = ref.lfq_quantize(z_BKhw.flatten(2).transpose(1, 2), T)
    assert torch.equal(out.signs.transpose(1, 2).reshape(B, K, h, w), q_BKhw)
    assert torch.equal(out.indices, idx_Bhw.reshape(B, h * w))
    assert torch.equal(out.indices, bits_to_indices(bits_BhwK).reshape(B, h * w))
    assert torch.equal(out.packed, pack_bits(bits_BhwK).reshape(B, h * w, -1))
    p = out.bit_probs.double()
    h_binary = (torch.special.entr(p) + torch.special.entr(1 - p)).sum(-1).mean()
    want = per_sample_entropy(z_BKhw.permute(0, 2, 3, 1).reshape(-1, K).double(), T)
    torch.testing.assert_close(h_binary, want, rtol=1e-5, atol=1e-6)


def test_reference_gradients_are_ste_plus_sigmoid_derivative():
    T = 0.25
    z = torch.randn(2, 7, 11, requires_grad=True)
    gs, gp = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    out = ref.lfq_quantize(z, T)
    (grad,) = torch.autograd.grad([out.signs, out.bit_probs], z, [gs, gp])
    p = torch.sigmoid(4 * z.detach() / T)
    torch.testing.assert_close(grad, gs + gp * (4 / T) * p * (1 - p))
    assert not out.indices.requires_grad and not out.packed.requires_grad


_SHAPES_BNK = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 32))


@settings(max_examples=60, deadline=None)
@given(z=_SHAPES_BNK.flatmap(lambda shape: hnp.arrays(
    np.float32, shape,
    elements=st.one_of(st.just(0.0), st.just(-0.0), st.floats(-3, 3, width=32)))))
def test_pack_unpack_round_trip_and_index_is_sum_of_bits(z):
    z_BNK = torch.from_numpy(z)
    K = z_BNK.shape[-1]
    out = ref.lfq_quantize(z_BNK)
    bits_BNK = z_BNK > 0
    assert torch.equal(out.signs, torch.where(bits_BNK, 1.0, -1.0))
    assert torch.equal(ref.unpack_to_signs(out.packed, K), out.signs)
    assert torch.equal(out.indices, sum(bits_BNK[..., k].long() << k for k in range(K)))
    bytes_as_int = sum(out.packed[..., j].long() << (8 * j) for j in range(out.packed.shape[-1]))
    assert torch.equal(bytes_as_int, out.indices)  # little-endian bytes read back = the index
    assert out.indices.min() >= 0 and out.indices.max() < 2**K


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_unpack_ignores_bits_past_K(K, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (2, 3, (K + 7) // 8), generator=g, dtype=torch.uint8)
    signs = ref.unpack_to_signs(packed, K, torch.bfloat16)
    assert signs.dtype == torch.bfloat16 and signs.shape == (2, 3, K)
    repacked = ref.lfq_quantize(signs.float()).packed
    high = K % 8
    mask = torch.full_like(packed, 255)
    if high:
        mask[..., -1] = (1 << high) - 1
    assert torch.equal(repacked, packed & mask)


@settings(max_examples=60, deadline=None)
@given(z=_SHAPES_BNK.flatmap(lambda shape: hnp.arrays(
    np.float32, shape,
    elements=st.one_of(st.just(0.0), st.just(-0.0), st.floats(-3, 3, width=32)))))
def test_index_helpers_are_the_quantizer_convention(z):
    """bits_to_indices(z) is lfq_quantize(z).indices (real input: set iff > 0, so +-0 is bit 0),
    and indices_to_bits inverts it back to the bits of the signs."""
    z_BNK = torch.from_numpy(z)
    out = lfq.lfq_quantize(z_BNK)
    assert torch.equal(lfq.bits_to_indices(z_BNK), out.indices)
    assert torch.equal(lfq.bits_to_indices(out.signs), out.indices)  # {-1,+1} codes
    bits_BNK = lfq.indices_to_bits(out.indices, z_BNK.shape[-1])
    assert bits_BNK.dtype == torch.bool and torch.equal(bits_BNK, out.signs > 0)
    assert torch.equal(lfq.bits_to_indices(bits_BNK), out.indices)


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, ref.MAX_INDEX_BITS), seed=st.integers(0, 2**31 - 1))
def test_index_helpers_round_trip_up_to_62_bits(K, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(3, 5, K, generator=g) < 0.5
    bits[0, 0] = True  # the largest index, 2**K - 1
    idx = lfq.bits_to_indices(bits)
    assert idx.dtype == torch.int64 and idx.shape == (3, 5) and idx.min() >= 0
    assert int(idx[0, 0]) == 2**K - 1
    assert torch.equal(lfq.indices_to_bits(idx, K), bits)


def test_index_helpers_bad_inputs():
    with pytest.raises(ValueError, match="K=63 bits do not fit an int64 index"):
        lfq.bits_to_indices(torch.zeros(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\*\*4\)"):
        lfq.indices_to_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"token_bits must be in \[1, 62\]"):
        lfq.indices_to_bits(torch.tensor([1]), 0)
    with pytest.raises(TypeError, match="integer tensor"):
        lfq.indices_to_bits(torch.tensor([1.0]), 4)
    assert lfq.indices_to_bits(torch.zeros(0, dtype=torch.int64), 5).shape == (0, 5)


def test_bad_inputs_say_what_and_how_to_fix():
    with pytest.raises(ValueError, match=r"\(B, N, K\).*flatten"):
        lfq.lfq_quantize(torch.randn(4, 8))
    with pytest.raises(ValueError, match="K must be in"):
        lfq.lfq_quantize(torch.randn(1, 2, 33))
    with pytest.raises(TypeError, match="float16"):
        lfq.lfq_quantize(torch.ones(1, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="temperature"):
        lfq.lfq_quantize(torch.randn(1, 2, 3), temperature=0.0)
    with pytest.raises(ValueError, match=r"need uint8 of shape \(B, N, 2\)"):
        lfq.unpack_to_signs(torch.zeros(1, 2, 1, dtype=torch.uint8), 9)


def test_dispatcher_uses_reference_on_cpu_and_obeys_vgen_kernels(monkeypatch):
    x = torch.zeros(1, 1, 1)
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    assert lfq._backend(x) is ref
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    assert lfq._backend(x) is ref
    monkeypatch.setenv("VGEN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="known: auto, reference, triton"):
        lfq.lfq_quantize(x)


def test_empty_input():
    out = lfq.lfq_quantize(torch.randn(0, 5, 12))
    assert out.signs.shape == (0, 5, 12) and out.packed.shape == (0, 5, 2)
    assert lfq.unpack_to_signs(out.packed, 12).shape == (0, 5, 12)


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes
# --------------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(16, 256, 12, torch.float32, temperature=0.01),  # MaskBit 12-bit, 16x16 tokens
    Case(32, 256, 18, torch.bfloat16, temperature=0.01),
    Case(64, 1024, 32, torch.float16),
    Case(8, 4096, 10, torch.float32, layout="strided"),
    Case(8, 4096, 14, torch.bfloat16, grads="signs", layout="strided"),
    Case(5, 999, 17, torch.float32, grads="probs"),
    Case(7, 2000, 13, torch.float16, grads="sum", layout="sliced"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_triton_matches_reference(case: Case):
    from kernels.lfq import triton as tk

    inp = {k: v.cuda() if isinstance(v, torch.Tensor) else v
           for k, v in _case_inputs(case, seed=7).items()}
    got = _run(tk, inp)
    _assert_matches_reference(got, inp, case.dtype, gpu=True, temperature=case.temperature)
    packed = got["packed"]
    assert torch.equal(tk.unpack_to_signs(packed, case.K, case.dtype), got["signs"].contiguous())
    assert lfq._backend(packed).__name__ == "kernels.lfq.triton"


@pytest.mark.gpu
def test_gpu_unpack_matches_reference_on_junk_bytes():
    from kernels.lfq import triton as tk

    for K in (1, 7, 8, 9, 16, 23, 32):
        packed = torch.randint(0, 256, (4, 2049, math.ceil(K / 8)), dtype=torch.uint8,
                               device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(tk.unpack_to_signs(packed, K, dtype),
                               ref.unpack_to_signs(packed, K, dtype))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
