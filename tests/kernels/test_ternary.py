"""Ternary (1.58-bit) linear: absmean quantization, 2-bit packing, Triton vs reference (outputs
and gradients), TernaryLinear, convert_linear_layers and the storage ratio.

The Triton comparisons run on CPU through ``TRITON_INTERPRET=1`` in one child process (this file
run as a script), because the interpreter switch is read when a kernel is defined and must not
leak into the rest of the test session. Inputs are made here, the child runs the Triton path on
them, and each parametrized test compares one case against the reference computed here.
GPU tests (marker ``gpu``) run the compiled kernels in-process at realistic sizes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as the interpreter child
    sys.path.insert(0, str(ROOT))

import kernels.ternary as tern  # noqa: E402
from kernels.ternary import reference as ref  # noqa: E402

# (rtol, atol) on outputs divided by the reference's std, so atol does not grow with K. Triton
# and the reference both accumulate in fp32 but in a different order and apply the scale at a
# different point; for fp16/bf16 that is at most about one ulp of the rounded result.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BF16_RATIO_BOUND = 1 / 7.7


@dataclass(frozen=True)
class Case:
    M: int
    N: int
    K: int
    dtype: torch.dtype
    path: str = "auto"  # auto: GEMV for M <= 4, tiled above
    bias: bool = True
    lead: tuple = ()  # x is lead + (M // prod(lead), K) instead of (M, K)
    strided: bool = False  # x is a (K, M) tensor seen as (M, K)

    @property
    def id(self) -> str:
        s = f"M{self.M}-N{self.N}-K{self.K}-{DTYPE_NAMES[self.dtype]}"
        if self.path != "auto":
            s += f"-{self.path}"
        if not self.bias:
            s += "-nobias"
        if self.lead:
            s += "-batched"
        return s + ("-strided" if self.strided else "")


CASES = [
    Case(1, 33, 70, torch.bfloat16),
    Case(1, 33, 70, torch.float16),
    Case(1, 33, 70, torch.float32),
    Case(1, 33, 70, torch.bfloat16, path="tiled"),
    Case(3, 17, 1030, torch.float32),  # GEMV: two K blocks of 1024, partial N blocks
    Case(4, 5, 3, torch.float16, bias=False),  # K < 4: a single, padded byte per row
    Case(2, 9, 11, torch.float32, strided=True),
    Case(17, 33, 70, torch.bfloat16),  # tiled: partial M, N and K blocks
    Case(17, 33, 70, torch.float16, strided=True),
    Case(5, 70, 130, torch.float32, path="tiled"),  # two N blocks, five K blocks of 32
    Case(6, 5, 3, torch.bfloat16, path="tiled", bias=False, lead=(2,)),
    Case(2, 9, 11, torch.float32, path="gemv", lead=(2,)),
]


def _case_inputs(case: Case, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w_NK = torch.randn(case.N, case.K, generator=g)
    packed, scale = ref.quantize_and_pack(w_NK)
    x_MK = torch.randn(case.M, case.K, generator=g).to(case.dtype)
    return {
        "x": x_MK.T.contiguous() if case.strided else x_MK,  # stored as (K, M) when strided
        "packed": packed, "scale": scale, "K": case.K,
        "bias": torch.randn(case.N, generator=g) if case.bias else None,
        "gy": torch.randn(case.M, case.N, generator=g).to(case.dtype),
        "path": case.path, "lead": case.lead, "strided": case.strided,
    }


def _run(fn, inp: dict) -> dict:
    """Forward + backward (to x and bias) of one implementation on one case's inputs."""
    x = inp["x"].clone().requires_grad_(True)
    x_in = x.T if inp["strided"] else x
    lead = inp["lead"]
    if lead:
        x_in = x_in.reshape(*lead, -1, inp["K"])
    bias = inp["bias"].clone().requires_grad_(True) if inp["bias"] is not None else None
    y = fn(x_in, inp["packed"], inp["scale"], inp["K"], bias)
    gy = inp["gy"].reshape(y.shape)
    wrt = [x] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, wrt, gy)
    return {"y": y.detach().reshape(-1, y.shape[-1]), "grad_x": grads[0],
            "grad_bias": grads[1] if bias is not None else None}


def _triton_fn(path: str):
    from kernels.ternary.triton import ternary_matmul_triton

    return lambda x, p, s, k, b: ternary_matmul_triton(x, p, s, k, b, path=path)


def _child(in_path: str, out_path: str) -> None:
    """Interpreter child: run the Triton path on every saved case (TRITON_INTERPRET=1 is set)."""
    from kernels.ternary import triton as tk

    inputs = torch.load(in_path)
    results = {"interpreted": tk.INTERPRETED, "backend": tern.ternary_backend(torch.zeros(1)),
               "cases": {cid: _run(_triton_fn(inp["path"]), inp) for cid, inp in inputs.items()}}
    # The dispatcher under VGEN_KERNELS=triton, on a module, without autograd.
    torch.manual_seed(0)
    layer = tern.TernaryLinear.from_linear(nn.Linear(70, 33))
    with torch.no_grad():
        x = torch.randn(1, 70)
        results["module"] = (layer.state_dict(), x, layer(x))
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    """Inputs and the child's Triton-interpreter results for every case."""
    d = tmp_path_factory.mktemp("ternary_interp")
    inputs = {c.id: _case_inputs(c, seed=i) for i, c in enumerate(CASES)}
    torch.save(inputs, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", VGEN_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(d / "in.pt"), str(d / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"Triton interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {"inputs": inputs, "results": torch.load(d / "out.pt")}


def _assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    s = want.float().std().clamp_min(1e-6) if want.numel() > 1 else 1.0
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float() / s, want.float() / s, rtol=rtol, atol=atol)


def _assert_matches_reference(got: dict, inp: dict, dtype: torch.dtype) -> None:
    want = _run(ref.ternary_matmul_reference, inp)
    _assert_close_scaled(got["y"], want["y"], dtype)
    _assert_close_scaled(got["grad_x"], want["grad_x"], dtype)
    if want["grad_bias"] is not None:
        torch.testing.assert_close(got["grad_bias"], want["grad_bias"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Quantization and packing (reference)
# --------------------------------------------------------------------------------------------------


def test_quantize_exact_values_on_hand_made_matrix():
    w = torch.tensor([
        [2.0, -2.0, 0.5, 1.5],      # scale 1.5: 1.33, -1.33, 0.33, 1
        [0.5, -0.5, 0.5, -2.5],     # scale 1.0: ties at +-0.5 round to even (0); -2.5 clamps
        [0.0, 0.0, 0.0, 0.0],       # scale EPS
        [-3.0, 3.0, 0.75, -0.25],   # scale 1.75: -1.71, 1.71, 0.43, -0.14
        [0.75, 0.25, 0.25, 0.25],   # scale 0.375: 2 clamps to 1; 0.67 rounds up to 1
    ], dtype=torch.bfloat16)
    wq, scale = ref.quantize_ternary(w)
    assert wq.dtype == torch.int8 and scale.dtype == torch.float32
    assert wq.tolist() == [[1, -1, 0, 1], [0, 0, 0, -1], [0, 0, 0, 0], [-1, 1, 0, 0],
                           [1, 1, 1, 1]]
    torch.testing.assert_close(scale, torch.tensor([1.5, 1.0, ref.EPS, 1.75, 0.375]),
                               rtol=0, atol=0)
    assert ref.EPS == 1e-5
    # 0b00 = 0, 0b01 = +1, 0b10 = -1; weight k at bits 2(k % 4): [1,-1,0,1] = 0b01_00_10_01.
    assert ref.pack_ternary(wq)[:, 0].tolist() == [0b01001001, 0b10000000, 0, 0b00000110,
                                                   0b01010101]


def test_pack_layout_padding_and_unused_code():
    wq = torch.tensor([[1, -1, 0, 1, -1, 1]], dtype=torch.int8)  # K = 6, padded to 8
    packed = ref.pack_ternary(wq)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b01001001, 0b00000110]]
    assert ref.unpack_ternary(packed, 6).tolist() == wq.tolist()
    assert ref.unpack_ternary(torch.tensor([[0xFF]], dtype=torch.uint8), 4).tolist() == [[0] * 4]
    with pytest.raises(ValueError, match=r"values must be in \{-1, 0, 1\}"):
        ref.pack_ternary(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="in_features=9 needs 3"):
        ref.unpack_ternary(packed, 9)


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 37)), data=st.data())
def test_pack_unpack_round_trip(shape, data):
    N, K = shape
    values = data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=N * K, max_size=N * K))
    wq = torch.tensor(values, dtype=torch.int8).reshape(N, K)
    packed = ref.pack_ternary(wq)
    assert packed.shape == (N, (K + 3) // 4) and packed.dtype == torch.uint8
    assert torch.equal(ref.unpack_ternary(packed, K), wq)
    padded = ref.unpack_ternary(packed, 4 * packed.shape[1])
    assert not padded[:, K:].any()  # padding is code 0
    assert not bool(((packed >> 1) & packed & 0b01010101).any())  # 0b11 is never written


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 8), K=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_quantize_is_absmean_and_dequantize_inverts_packing(N, K, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 3
    wq, scale = ref.quantize_ternary(w)
    torch.testing.assert_close(scale, w.abs().mean(1).clamp_min(ref.EPS))
    assert torch.equal(wq.float(), (w / scale[:, None]).round().clamp(-1, 1))
    packed, scale2 = ref.quantize_and_pack(w)
    assert torch.equal(scale2, scale)
    assert torch.equal(ref.dequantize_ternary(packed, scale, K), wq.float() * scale[:, None])


def test_reference_matmul_is_fp32_then_cast():
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(7, 13, generator=g), torch.randn(7, generator=g)
    packed, scale = ref.quantize_and_pack(w)
    x = torch.randn(2, 3, 13, generator=g).to(torch.bfloat16)
    y = ref.ternary_matmul_reference(x, packed, scale, 13, bias)
    wq, _ = ref.quantize_ternary(w)
    want = (x.float() @ (wq.float() * scale[:, None]).T + bias).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 7) and torch.equal(y, want)
    with pytest.raises(ValueError, match="x has 12 input features"):
        ref.ternary_matmul_reference(x[..., :12], packed, scale, 13)
    with pytest.raises(ValueError, match=r"scale must be a float tensor of shape \(7,\)"):
        ref.ternary_matmul_reference(x, packed, scale[:6], 13)


# --------------------------------------------------------------------------------------------------
# Triton (interpreter child) vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_interpreter_matches_reference(interp, case: Case):
    assert interp["results"]["interpreted"]
    _assert_matches_reference(interp["results"]["cases"][case.id], interp["inputs"][case.id],
                              case.dtype)


def test_vgen_kernels_triton_forces_triton_in_child(interp):
    assert interp["results"]["backend"] == "triton"
    state, x, y = interp["results"]["module"]
    want = ref.ternary_matmul_reference(x, state["packed"], state["scale"], 70, state["bias"])
    _assert_close_scaled(y, want, torch.float32)


def test_dispatcher_uses_reference_on_cpu_and_obeys_vgen_kernels(monkeypatch):
    x = torch.zeros(1, 4)
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    assert tern.ternary_backend(x) == "reference"
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    assert tern.ternary_backend(x) == "reference"
    monkeypatch.setenv("VGEN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="known: auto, reference, triton"):
        tern.ternary_matmul(x, torch.zeros(2, 1, dtype=torch.uint8), torch.ones(2), 4)


# --------------------------------------------------------------------------------------------------
# TernaryLinear and convert_linear_layers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ternary_linear_from_linear_matches_reference(bias):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33, bias=bias)
    layer = tern.TernaryLinear.from_linear(linear)
    packed, scale = ref.quantize_and_pack(linear.weight)
    assert torch.equal(layer.packed, packed) and torch.equal(layer.scale, scale)
    assert layer.packed.shape == (33, 18) and layer.packed.dtype == torch.uint8
    assert [n for n, _ in layer.named_parameters()] == []
    assert sorted(layer.state_dict()) == sorted(["packed", "scale"] + (["bias"] if bias else []))
    x = torch.randn(2, 5, 70, requires_grad=True)
    y = layer(x)
    b = linear.bias.detach() if bias else None
    assert torch.equal(y, ref.ternary_matmul_reference(x, packed, scale, 70, b))
    torch.testing.assert_close(y, F.linear(x, layer.dequantized_weight(), b))
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(2, 5, 70))
    again = tern.TernaryLinear(70, 33, bias=bias)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), y)
    assert "in_features=70, out_features=33" in repr(layer) and "ternary 2-bit" in repr(layer)
    assert f"bias={bias}" in repr(layer)


class _Block(nn.Module):
    """A DiT-style block: adaLN modulation, attention through qkv/proj linears, an MLP."""

    def __init__(self, dim: int = 512, heads: int = 4, hidden: int = 1024):
        super().__init__()
        self.heads = heads
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        shift, scale = self.adaLN(c_BD)[:, None].chunk(2, dim=-1)
        h = self.norm1(x_BTD) * (1 + scale) + shift
        q, k, v = self.qkv(h).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x_BTD = x_BTD + self.proj(a)
        return x_BTD + self.mlp(self.norm2(x_BTD))


def _dequantized_copy(model: nn.Module, converted: nn.Module) -> nn.Module:
    """``model`` with each converted linear's weight replaced by its dequantized ternary weight."""
    dense = copy.deepcopy(model)
    for name, m in converted.named_modules():
        if isinstance(m, tern.TernaryLinear):
            dense.get_submodule(name).weight.data.copy_(m.dequantized_weight())
    return dense


def _weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(packed + scale bytes, bf16 bytes of the same weights) from the actual buffers."""
    after = bf16 = 0
    for m in model.modules():
        if isinstance(m, tern.TernaryLinear):
            after += m.packed.untyped_storage().nbytes() + m.scale.untyped_storage().nbytes()
            bf16 += m.out_features * m.in_features * torch.bfloat16.itemsize
    return after, bf16


@pytest.mark.parametrize("skip", ["patterns", "callable"])
def test_convert_transformer_block(skip):
    torch.manual_seed(0)
    block = _Block()
    original = copy.deepcopy(block)
    skip_arg = ["adaLN"] if skip == "patterns" else (lambda name, m: m.out_features == 1024)
    report = tern.convert_linear_layers(block, skip=skip_arg)
    if skip == "patterns":
        assert report.converted == ["qkv", "proj", "mlp.0", "mlp.2"]
        assert report.skipped == {"adaLN": "matched skip"}
    else:  # adaLN (512 -> 1024) and mlp.0 (512 -> 1024)
        assert report.converted == ["qkv", "proj", "mlp.2"]
        assert set(report.skipped) == {"adaLN", "mlp.0"}
    kinds = {n: type(m) for n, m in block.named_modules() if n in report.converted + list(
        report.skipped)}
    assert all(kinds[n] is tern.TernaryLinear for n in report.converted)
    assert all(kinds[n] is nn.Linear for n in report.skipped)

    x, c = torch.randn(2, 7, 512), torch.randn(2, 512)
    with torch.no_grad():
        y = block(x, c)
        want = _dequantized_copy(original, block)(x, c)
    assert y.shape == (2, 7, 512) and torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)

    after, bf16 = _weight_bytes(block)
    assert after == report.bytes_after and bf16 == report.bf16_bytes
    assert report.bytes_before == 2 * bf16  # the original weights were fp32
    assert after <= BF16_RATIO_BOUND * bf16, f"{after} / {bf16} = 1/{bf16 / after:.2f}"
    assert report.ratio_to_bf16 <= BF16_RATIO_BOUND and "of bf16" in str(report)


def test_convert_sequential_with_shared_layer_and_pattern():
    torch.manual_seed(0)
    shared = nn.Linear(512, 512)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), shared, nn.Sequential(shared, shared),
                          nn.Linear(512, 10))
    report = tern.convert_linear_layers(model, skip="4")
    assert report.converted == ["0", "2", "3.0", "3.1"] and list(report.skipped) == ["4"]
    assert model[2] is model[3][0] is model[3][1] and isinstance(model[2], tern.TernaryLinear)
    assert report.bf16_bytes == 2 * 512 * 512 * 2  # the shared weight counted once
    assert model(torch.randn(3, 512)).shape == (3, 10)


def test_convert_keeps_linears_that_torch_modules_read_directly():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(64, 8))
    report = tern.convert_linear_layers(model)
    assert report.converted == ["1"]
    assert set(report.skipped) == {"0.self_attn.out_proj", "0.linear1", "0.linear2"}
    x = torch.randn(2, 5, 64)
    for mode in (model.train, model.eval):  # eval takes the encoder layer's fused fast path
        mode()
        with torch.no_grad():
            assert model(x).shape == (2, 5, 8)


@pytest.mark.parametrize("shape", [(3072, 3072), (12288, 3072), (3072, 12288), (1000, 412)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_weight_bytes_ratio_from_buffers(shape):
    N, K = shape
    layer = tern.TernaryLinear(K, N, bias=False)
    after = layer.packed.untyped_storage().nbytes() + layer.scale.untyped_storage().nbytes()
    assert after == layer.weight_nbytes() == N * ((K + 3) // 4) + 4 * N
    assert after <= BF16_RATIO_BOUND * N * K * 2


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes
# --------------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(1, 3072, 3072, torch.bfloat16),
    Case(1, 12288, 3072, torch.float16),
    Case(1, 3072, 12288, torch.bfloat16),
    Case(1, 3001, 4099, torch.float32),
    Case(1, 3072, 3072, torch.bfloat16, path="tiled"),
    Case(4, 3072, 3072, torch.bfloat16, strided=True),
    Case(77, 3072, 3072, torch.bfloat16),
    Case(333, 1000, 1234, torch.float16, bias=False),
    Case(4096, 3072, 3072, torch.bfloat16),
    Case(1024, 12288, 3072, torch.bfloat16, lead=(4,)),
    Case(517, 3001, 999, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_triton_matches_reference(case: Case):
    inp = {k: v.cuda() if isinstance(v, torch.Tensor) else v
           for k, v in _case_inputs(case, seed=7).items()}
    got = _run(_triton_fn(case.path), inp)
    _assert_matches_reference(got, inp, case.dtype)


@pytest.mark.gpu
def test_gpu_dispatcher_and_module_use_triton(monkeypatch):
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    linear = nn.Linear(3072, 3072).cuda()
    model = nn.Sequential(linear)
    tern.convert_linear_layers(model)
    x = torch.randn(2, 3072, device="cuda", dtype=torch.bfloat16)
    assert tern.ternary_backend(x) == "triton"
    y = model(x)
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    _assert_close_scaled(y, model(x), torch.bfloat16)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
