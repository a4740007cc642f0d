"""GRAT at sampling time for xAR and DiMR (`sample(attention="grat")`), as DeepFlow's in
test_grat_sampling.py: a full GRAT mask samples like dense attention, the pattern is the one
stated (xAR: GRAT AND block-causal; DiMR: the class token dense), training stays dense, a tiny
trained model's GRAT samples stay close to its dense ones but differ, bad groups say the fix, and
evaluate.generation passes the option through."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the interpreter worker: TRITON_INTERPRET before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from kernels.grat import grat_density
from kernels.grat.reference import make_spec
from vgen_core import families
from vgen_core.generators import dimr, xar
from vgen_core.generators.dimr import DiMR, dimr_config, dimr_loss
from vgen_core.generators.flow import grat_token_mask, inference_attention_options
from vgen_core.generators.xar import XAR, block_causal_mask, grat_sequence_mask, xar_config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_grat_token_mask_is_the_criss_cross_pattern_in_raster_order():
    """4x4 grid, 2x2 groups: token (r, c) attends (r', c') iff same group row or group column."""
    mask = grat_token_mask(inference_attention_options("grat", (4, 4), groups=(2, 2)))
    r, c = torch.arange(16) // 4 // 2, torch.arange(16) % 4 // 2  # group row, group column
    want = (r[:, None] == r) | (c[:, None] == c)
    assert torch.equal(mask, want) and int(mask.sum()) == 192  # 16 x 12: 3 of 4 groups
    with pytest.raises(ValueError, match="not GRAT options"):
        grat_token_mask({})


# --------------------------------------------------------------------------------------------------
# xAR: GRAT AND the block-causal mask (masked SDPA)
# --------------------------------------------------------------------------------------------------


def _xar() -> XAR:
    torch.manual_seed(0)
    return xar_config("tiny").build()  # 4x8x8 latents: 8x8 tokens, 4 cells of 4x4


def _xar_sample(model: XAR, seed: int = 0, **kw) -> torch.Tensor:
    kw = {"num_steps": 4, "cfg": 2.0, **kw}
    return xar.sample(model, torch.tensor([1, 3]), generator=torch.Generator().manual_seed(seed),
                      **kw)


XAR_FULL = [
    pytest.param(dict(grat_groups=(8, 8)), id="X-one-group"),
    pytest.param(dict(grat_groups=(4, 4), grat_variant="block", grat_radius=1), id="B-r1-2x2"),
]


@pytest.mark.parametrize("kw", XAR_FULL)
def test_xar_full_grat_mask_samples_exactly_like_dense(kw):
    model = _xar()
    dense = _xar_sample(model)
    grat = _xar_sample(model, attention="grat", **kw)
    # the intersection is the block-causal mask itself: measured max |diff| 0 (cached path)
    assert torch.equal(grat, dense)
    no_cache = _xar_sample(model, attention="grat", use_cache=False, **kw)
    torch.testing.assert_close(no_cache, dense, atol=1e-5, rtol=0)  # measured 1.4e-6
    assert model.inference_mask is None and model.training  # restored


def test_xar_mask_is_grat_and_block_causal_in_cell_major_order():
    """2x2 groups on the 8x8 grid (a 4x4 group grid), cells of 4x4 in cell-major order."""
    cfg = xar_config("tiny")
    mask = grat_sequence_mask(cfg, inference_attention_options("grat", (8, 8), groups=(2, 2)))
    assert mask is not None and mask.shape == (64, 64)
    # cell-major position s -> (row, col): cell k = (k // 2, k % 2), 4x4 tokens raster in it
    s = torch.arange(64)
    row = s // 16 // 2 * 4 + s % 16 // 4
    col = s // 16 % 2 * 4 + s % 4
    gr, gc = row // 2, col // 2
    assert torch.equal(mask, (gr[:, None] == gr) | (gc[:, None] == gc))
    both = mask & block_causal_mask(cfg.clusters, cfg.cell_len)
    # keys of each cell's 16 queries: causal 16/32/48/64 each; GRAT-X keeps the groups in the
    # query group's row or column (7 of 16, 28 tokens) among them: cell 0 3 groups (its own
    # cell), cells 1 and 2 5 (2 in cell 0 + 3 of their own), cell 3 all 7
    per_cell = [int(both[16 * k : 16 * (k + 1)].sum()) for k in range(4)]
    assert per_cell == [16 * 12, 16 * 20, 16 * 20, 16 * 28]
    assert sum(per_cell) / int(block_causal_mask(4, 16).sum()) == 0.5
    assert bool(both.diagonal().all())  # every query keeps itself: no empty row


def test_xar_grat_applies_in_eval_only_and_cache_matches_full_forward():
    model = _xar()
    options = inference_attention_options("grat", (8, 8), groups=(2, 2))
    x, y = torch.randn(2, 64, 4), torch.tensor([0, 5])
    t = torch.tensor([[0.0, 0.0, 0.7, 1.0], [0.0, 0.0, 0.3, 1.0]])
    with torch.no_grad():
        dense_eval = model.eval()(x, t, y)
        dense_train = model.train()(x, t, y)
        with xar.inference_attention(model, options):
            train = model.train()(x, t, y)  # training always runs dense attention
            grat = model.eval()(x, t, y)
            cache = None  # cells 0, 1 clean through the cache, then cell 2 at its t
            for k in range(2):
                _, cache = model.forward_cell(x[:, 16 * k : 16 * (k + 1)], torch.zeros(2), y,
                                              k, cache)
            cell2 = model.forward_cell(x[:, 32:48], t[:, 2], y, 2, cache)[0]
        after = model.eval()(x, t, y)
    assert torch.equal(train, dense_train) and torch.equal(after, dense_eval)
    assert model.inference_mask is None
    torch.testing.assert_close(cell2, grat[:, 32:48], atol=1e-5, rtol=1e-5)
    for k in range(4):  # every cell, cell 0 too (its 2x2 groups see 3 of its 4)
        assert not torch.allclose(grat[:, 16 * k : 16 * (k + 1)],
                                  dense_eval[:, 16 * k : 16 * (k + 1)], atol=1e-3)


def test_xar_grat_on_a_tiny_trained_model_stays_close_to_dense():
    """40 AdamW steps on four fixed latents (test_xar's overfit set), then 8-step samples of the
    same noise with dense and GRAT attention, against the spread between two noise seeds.

    Measured (seed 0, 1 thread), relative L2 difference from the dense samples: GRAT-X groups 4x4
    (the cells: the last cell loses the diagonal one) 0.023, GRAT-X 2x2 (GRAT density 0.44)
    0.059, GRAT-B r=0 2x2 (each group alone, 0.06) 0.159; two dense seeds differ by 1.23. The
    bounds leave ~3x margin.
    """
    model = _xar()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = {"latents": x.repeat(2, 1, 1, 1), "label": torch.arange(4).repeat(2)}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        loss, _ = xar.xar_loss(model, batch, step, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(seed: int = 0, **kw) -> torch.Tensor:
        return xar.sample(model, torch.arange(4), num_steps=8, cfg=1.0,
                          generator=torch.Generator().manual_seed(seed), **kw)

    dense = run()
    seeds = _rel(run(seed=1), dense)
    x44 = _rel(run(attention="grat", grat_groups=(4, 4)), dense)
    x22 = _rel(run(attention="grat", grat_groups=(2, 2)), dense)
    b0 = _rel(run(attention="grat", grat_groups=(2, 2), grat_variant="block", grat_radius=0),
              dense)
    print(f"xAR relative difference from dense: GRAT-X 4x4 {x44:.3f}, GRAT-X 2x2 {x22:.3f}, "
          f"GRAT-B r=0 {b0:.3f}; dense seed 0 vs 1: {seeds:.3f}")
    assert 0.0 < x44 < 0.07 and 0.0 < x22 < 0.18 and 0.0 < b0 < 0.45
    assert x44 < x22 < b0 < seeds / 2


def test_xar_bad_grat_settings_say_how_to_fix():
    model = _xar()
    with pytest.raises(ValueError, match=r"xAR .*8x8 latent token grid.*pick a divisor of 8"):
        _xar_sample(model, attention="grat", grat_groups=(3, 3))
    with pytest.raises(ValueError, match="must be two ints"):
        _xar_sample(model, attention="grat", grat_groups=(2, 2, 2))
    with pytest.raises(ValueError, match="known: criss_cross"):
        _xar_sample(model, attention="grat", grat_groups=(2, 2), grat_variant="diagonal")
    with pytest.raises(ValueError, match="known: dense, grat"):
        _xar_sample(model, attention="sparse")
    assert model.training  # refused before the model was touched


# --------------------------------------------------------------------------------------------------
# DiMR: GRAT in the Transformer stage through kernels.grat, class token dense
# --------------------------------------------------------------------------------------------------


def _dimr() -> DiMR:
    torch.manual_seed(0)
    return dimr_config("tiny").build()  # Transformer stage on 4x4 tokens + class token


def _dimr_sample(model: DiMR, seed: int = 0, **kw) -> torch.Tensor:
    kw = {"num_steps": 5, "cfg_scale": 0.4, **kw}
    return dimr.sample(model, torch.tensor([1, 3]),
                       generator=torch.Generator().manual_seed(seed), **kw)


DIMR_FULL = [
    pytest.param(dict(grat_groups=(4, 4)), id="X-one-group"),
    pytest.param(dict(grat_groups=(2, 2), grat_variant="block", grat_radius=1), id="B-r1-2x2"),
]


@pytest.mark.parametrize("kw", DIMR_FULL)
def test_dimr_full_grat_mask_samples_like_dense(kw):
    model = _dimr()
    dense = _dimr_sample(model)
    grat = _dimr_sample(model, attention="grat", **kw)
    v, r = kw.get("grat_variant", "criss_cross"), kw.get("grat_radius", 1)
    spec = make_spec((1, 4, 4), (1, *kw["grat_groups"]), v, 1, None, (0, r, r))
    assert grat_density(spec) == 1.0
    # the class token moves to the kernel's text slot and back, which changes the order of the
    # softmax sums only: measured max |diff| 5.7e-6 and 7.6e-6 on samples of max |x| 66
    scale = float(dense.abs().max())
    assert float((grat - dense).abs().max()) <= 1e-6 * scale
    assert model.training
    assert all(m.block1.inference_options == {} for m in model.stages[0].blocks)  # restored


def test_dimr_class_token_attends_and_is_attended_densely():
    """One self-attention of the stage, GRAT-B r=0 on 2x2 groups (every group alone): a grid
    token changes only its group's outputs and the class token's; the class token changes all."""
    torch.manual_seed(0)
    attn = dimr._SelfAttention(8, 2).eval()
    attn.inference_options = inference_attention_options("grat", (4, 4), groups=(2, 2),
                                                         variant="block", radius=0)
    x, tau = torch.randn(2, 17, 8), torch.zeros(1)  # [class, 4x4 grid tokens raster]
    with torch.no_grad():
        out = attn(x, tau)
        x_grid = x.clone()
        x_grid[:, 1 + 15] += 1.0  # grid token (3, 3): group (1, 1) = tokens (2..3, 2..3)
        changed = (attn(x_grid, tau) != out).any(-1).any(0)
        x_cls = x.clone()
        x_cls[:, 0] += 1.0
        changed_cls = (attn(x_cls, tau) != out).any(-1).any(0)
    want = torch.zeros(17, dtype=torch.bool)
    want[[0, 1 + 10, 1 + 11, 1 + 14, 1 + 15]] = True
    assert torch.equal(changed, want)
    assert bool(changed_cls.all())
    # 4 groups of 4 -> 64 image pairs + 16 image -> class + 17 class -> all, of 17 x 17
    assert grat_density(make_spec((1, 4, 4), (1, 2, 2), "block", 1, None, 0)) == 97 / 289


def test_dimr_grat_options_per_stage_and_training_stays_dense():
    stages = (dimr._transformer(16, 2, 2).model_copy(update={"input_feature_ratio": 4}),
              dimr._transformer(16, 2, 2), dimr._convnext(8, 2))
    cfg = dimr_config("tiny", input_size=16, stages=stages, loss_coeffs=(0.1, 0.25, 1.0))
    opts = dimr.inference_attention_by_stage(cfg, "grat", groups=(4, 4))
    assert [o.get("grid") for o in opts] == [(1, 4, 4), (1, 8, 8), None]
    assert opts[0]["groups"] == opts[1]["groups"] == (1, 4, 4) and opts[2] == {}
    assert dimr.inference_attention_by_stage(cfg, "dense") == [{}, {}, {}]
    # groups must tile every Transformer stage's grid: 8x8 fits stage 1, not stage 0
    with pytest.raises(ValueError, match=r"stage 0 \(Transformer on 4x4 tokens\).*divisor of 4"):
        dimr.inference_attention_by_stage(cfg, "grat", groups=(8, 8))
    torch.manual_seed(0)
    model = cfg.build()
    x, code, y = torch.randn(2, 4, 16, 16), torch.tensor([1.0, 1.0]), torch.tensor([0, 2])
    sparse = dimr.inference_attention_by_stage(cfg, "grat", groups=(2, 2), variant="block",
                                               radius=0)
    with torch.no_grad():
        dense_train = model.train()(x, code, y)
        dense_eval = model.eval()(x, code, y)
        with dimr.inference_attention(model, sparse):
            train = model.train()(x, code, y)
            grat = model.eval()(x, code, y)
        after = model.eval()(x, code, y)
    assert all(torch.equal(a, b) for a, b in zip(train, dense_train))
    assert all(torch.equal(a, b) for a, b in zip(after, dense_eval))
    assert not torch.allclose(grat[0], dense_eval[0], atol=1e-4)  # both stages' outputs move
    assert not torch.allclose(grat[1], dense_eval[1], atol=1e-4)
    with pytest.raises(ValueError, match="3 stages"):
        with dimr.inference_attention(model, sparse[:2]):
            pass


def test_dimr_grat_on_a_tiny_trained_model_stays_close_to_dense():
    """40 AdamW steps on SPEC.example_batch(tiny, 4, seed 0) (test_dimr's golden-curve set), then
    10-step DPM-Solver++ samples of the same noise with dense and GRAT attention.

    Measured (seed 0, 1 thread), relative L2 difference from the dense samples: GRAT-X 2x2
    (density 0.78 with the class token) 0.0020, GRAT-B r=0 2x2 (each group alone, 0.34) 0.0051;
    two dense seeds differ by 1.45. The differences are small because the attention stage is
    the coarse one (4x4 tokens); the 8x8 ConvNeXt stage makes the output. Bounds ~3x margin.
    """
    spec = families.get("dimr")
    cfg = spec.config("tiny")
    torch.manual_seed(0)
    model = spec.build_config(cfg)
    batch = spec.example_batch(cfg, 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(dimr.optimizer_param_groups(model, 0.03), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        loss, _ = dimr_loss(model, batch, step, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(seed: int = 0, **kw) -> torch.Tensor:
        return dimr.sample(model, batch["label"], num_steps=10,
                           generator=torch.Generator().manual_seed(seed), **kw)

    dense = run()
    seeds = _rel(run(seed=1), dense)
    x22 = _rel(run(attention="grat", grat_groups=(2, 2)), dense)
    b0 = _rel(run(attention="grat", grat_groups=(2, 2), grat_variant="block", grat_radius=0),
              dense)
    print(f"DiMR relative difference from dense: GRAT-X 2x2 {x22:.4f}, GRAT-B r=0 {b0:.4f}; "
          f"dense seed 0 vs 1: {seeds:.3f}")
    assert 1e-4 < x22 < 0.006 and 1e-4 < b0 < 0.015
    assert x22 < b0 < seeds / 100


def test_dimr_bad_grat_settings_say_how_to_fix():
    model = _dimr()
    with pytest.raises(ValueError, match=r"DiMR .*stage 0 \(Transformer on 4x4 tokens\).*"
                                         r"pick a divisor of 4"):
        _dimr_sample(model, attention="grat", grat_groups=(3, 3))
    with pytest.raises(ValueError, match="known: criss_cross"):
        _dimr_sample(model, attention="grat", grat_groups=(2, 2), grat_variant="diagonal")
    with pytest.raises(ValueError, match="must be >= 0"):
        _dimr_sample(model, attention="grat", grat_groups=(2, 2), grat_variant="block",
                     grat_radius=-1)


def _interpreter_worker() -> None:
    """Subprocess entry point: DiMR GRAT samples via VGEN_KERNELS=reference and =triton (the
    block-sparse kernel with the class token in its text slot); one JSON line."""
    torch.set_num_threads(1)
    model = _dimr()
    kw: dict[str, Any] = dict(attention="grat", grat_groups=(2, 2), num_steps=3)
    os.environ["VGEN_KERNELS"] = "reference"
    ref = _dimr_sample(model, **kw)
    os.environ["VGEN_KERNELS"] = "triton"
    tri = _dimr_sample(model, **kw)
    os.environ["VGEN_KERNELS"] = "reference"
    dense = _dimr_sample(model, num_steps=3)
    print(json.dumps({"max_err": (tri - ref).abs().max().item(),
                      "scale": ref.abs().max().item(),
                      "vs_dense": (ref - dense).abs().max().item()}), flush=True)


def test_dimr_grat_through_the_triton_kernel_matches_reference():
    from test_grat_sampling import interpreter_row

    row = interpreter_row(__file__)
    assert row["max_err"] <= 1e-5 * max(1.0, row["scale"]), row  # measured 7.6e-6 (scale 67)
    assert row["vs_dense"] > 1e-3, row  # the sparse pattern did change them (measured 0.076)


# --------------------------------------------------------------------------------------------------
# evaluate.generation: with.sampler carries the option to every family that takes it
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepflow", "xar", "dimr"])
def test_evaluate_generation_takes_the_attention_option(family, tmp_path):
    from pipelines.stages.base import StageContext, StageError
    from pipelines.stages.evaluate_generation import EvaluateGeneration, EvaluateGenerationConfig
    from vgen_core.data import TableStore

    ctx = StageContext(dag="t", stage="eval", store=TableStore(str(tmp_path)),
                       row_fingerprint="f", inputs={})
    grat = {"attention": "grat", "grat_groups": [2, 2], "grat_variant": "block", "grat_radius": 0}
    spec = families.get(family)
    stage = EvaluateGeneration(EvaluateGenerationConfig(sampler=grat), ctx)
    stage._check_sampler(spec)  # accepted: the sampler takes these keywords
    gen_cfg = {"family": family, **spec.config("tiny").model_dump(mode="json")}
    assert stage.sampler_options(spec, gen_cfg) == (None, grat)  # what the actors get
    dense = EvaluateGenerationConfig(sampler={"attention": "dense"})
    assert stage.config.model_dump(mode="json") != dense.model_dump(mode="json")  # fingerprint
    typo = EvaluateGeneration(EvaluateGenerationConfig(sampler={"atention": "grat"}), ctx)
    with pytest.raises(StageError, match="does not take"):
        typo._check_sampler(spec)


if __name__ == "__main__":
    _interpreter_worker()
