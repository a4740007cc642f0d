"""1.58-bit generators: the QAT layer, self-distillation, the packed / dequantized exports, and
the ``quantize.ternary`` stage in-process on a tiny MaskGIT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kernels.ternary import TernaryLinear, quantize_ternary
from pipelines.stages.base import InProcessExecutor, OutputRef, StageContext, StageError
from pipelines.stages.quantize import QuantizeTernary, QuantizeTernaryConfig
from vgen_core import families
from vgen_core.data import TableStore
from vgen_core.tokenizers.io import load_pretrained, save_pretrained, weights_digest
from vgen_core.training.ternary import (DEFAULT_KEEP, TernaryQATLinear, dequantized_student,
                                        pack_student, samples_as_batch, self_distill, to_qat)

SMALL = {"seq_len": 16, "codebook_size": 32}


def _maskgit(seed: int = 0, **over):
    torch.manual_seed(seed)
    return families.get("maskgit").build("tiny", {**SMALL, **over}).eval()


def test_qat_linear_forward_is_the_ternary_weight_and_its_gradient_passes_straight_through():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    qat = TernaryQATLinear(lin)
    x = torch.randn(3, 12, requires_grad=True)
    codes, scale = quantize_ternary(lin.weight)
    w = codes.float() * scale[:, None]
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(qat(x), F.linear(x, w, lin.bias), rtol=0, atol=0)
    qat(x).sum().backward()
    # straight-through: d/dW of sum(x W^T) is the same as for an ordinary linear
    torch.testing.assert_close(qat.weight.grad, torch.ones(3, 5).T @ x.detach())


def test_packed_and_dequantized_students_compute_the_same_function():
    model = _maskgit()
    student = _maskgit()
    converted, kept = to_qat(student)
    assert converted and all(not any(p in n for p in ("head", "emb")) for n in converted)
    assert all("full precision" in why or "reads .weight" in why for why in kept.values())
    packed, report = pack_student(student)
    plain = dequantized_student(student)
    assert sum(isinstance(m, TernaryLinear) for m in packed.modules()) == len(converted)
    assert type(plain) is type(model) and set(plain.state_dict()) == set(model.state_dict())
    tokens = torch.randint(0, 33, (2, 16))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens, labels), plain(tokens, labels),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(student(tokens, labels), plain(tokens, labels),
                                   rtol=1e-5, atol=1e-5)


def test_weight_bytes_of_the_converted_layers_are_at_most_1_over_7_7_of_bf16():
    """2 bits per weight plus one fp32 scale per row: 1/8 + 2/in_features of bf16 (in >= 512
    gives <= 1/7.7: every released generator is far wider)."""
    student = _maskgit(hidden=640, heads=8, mlp_dim=1280, depth=1)
    converted, _ = to_qat(student)
    _, report = pack_student(student)
    assert report.converted == converted
    assert report.bytes_after <= report.bf16_bytes / 7.7, str(report)
    assert report.bytes_before == 2 * report.bf16_bytes  # fp32 latents


def test_self_distillation_loss_falls():
    spec = families.get("maskgit")
    teacher = _maskgit(seed=0)
    labels = torch.arange(32) % 10
    with torch.no_grad():
        out = spec.sampler(teacher, labels, generator=torch.Generator().manual_seed(0), steps=4)
    pool = samples_as_batch(spec, out, labels)
    assert pool["tokens"].shape == (32, 16)
    student = _maskgit(seed=0)
    to_qat(student, DEFAULT_KEEP)
    curve = self_distill(teacher, student, spec, pool, steps=60, batch_size=8, lr=3e-3, seed=0)
    first, last = sum(curve[:6]) / 6, sum(curve[-6:]) / 6
    assert last < 0.5 * first, (first, last)


def test_latent_samples_become_moments_the_loss_draws_exactly():
    spec = families.get("deepflow")
    out = torch.randn(2, 4, 8, 8)
    batch = samples_as_batch(spec, out, torch.tensor([0, 1]))
    mean, logvar = batch["moments"].chunk(2, dim=1)
    assert torch.equal(mean, out) and float(torch.exp(0.5 * logvar).max()) < 1e-6


def _stage(tmp_path: Path, gen_dir: Path, **cfg) -> QuantizeTernary:
    ref = OutputRef("model", "gen", str(gen_dir), digest=weights_digest(load_pretrained(gen_dir)))
    ctx = StageContext(dag="t", stage="q", store=TableStore(str(tmp_path / "store")),
                       row_fingerprint="fp-q", inputs={"gen": {"generator": ref}})
    return QuantizeTernary(QuantizeTernaryConfig(**cfg), ctx)


def test_quantize_ternary_stage_exports_and_reports(tmp_path):
    gen_dir = save_pretrained(_maskgit(), tmp_path / "gen")
    stage = _stage(tmp_path, gen_dir, steps=30, batch_size=8, pool_size=16, lr=3e-3,
                   speed_samples=4, sampler={"steps": 4})
    result = stage.run(InProcessExecutor())
    ref = result.outputs["generator"]
    model = load_pretrained(ref.uri)
    assert weights_digest(model) == ref.digest and model.family == "maskgit"
    m = result.metrics
    assert m["ternary.converted_layers"] > 0
    assert m["ternary.weight_bytes_packed"] < m["ternary.weight_bytes_bf16"] / 4
    assert m["model_bytes.ternary"] < m["model_bytes.fp"]
    assert m["distill.loss_last"] < m["distill.loss_first"]
    assert m["sample.per_s_fp"] > 0 and m["sample.per_s_ternary"] > 0
    assert "peak_memory.fp" not in m  # CPU: no allocator statistic
    packed = load_file(str(Path(ref.uri) / "ternary.safetensors"))
    assert any(k.endswith(".packed") and v.dtype == torch.uint8 for k, v in packed.items())
    info = json.loads((Path(ref.uri) / "ternary.json").read_text())
    assert len(info["converted"]) == m["ternary.converted_layers"]
    # every converted linear of the export holds code x scale: at most 3 distinct values a row
    qkv = model.state_dict()[next(k for k in model.state_dict() if k.endswith("qkv.weight"))]
    assert all(len(row.unique()) <= 3 for row in qkv)


def test_a_text_generator_is_refused(tmp_path):
    torch.manual_seed(0)
    gen_dir = save_pretrained(families.get("maskgen_vq").build("tiny"), tmp_path / "gen")
    with pytest.raises(StageError, match="class-conditional"):
        _stage(tmp_path, gen_dir, steps=1).run(InProcessExecutor())
