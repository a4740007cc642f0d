"""GRAT kernel: mask and permutation against brute-force definitions, block layout against the
dense mask, FlexAttention and Triton (CPU interpreter; GPU at realistic sizes) against the
reference, outputs and gradients.

The Triton comparisons on CPU run in one subprocess (this file run as a script) with
TRITON_INTERPRET=1 set before triton is imported, so they hold whatever this pytest process
imported first; each case is then asserted by its own parametrized test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

if __name__ == "__main__":  # the interpreter worker (see interpreter_results): before any triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import kernels.grat as grat
from kernels.grat import reference as ref
from kernels.grat._layout import block_layout, block_matrices

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# brute-force definitions, written from the paper/official code independently of reference.py


def brute_mask(grid, groups, variant="criss_cross", n_text=0, n_valid=None, radius=(1, 1, 1)):
    """(L, L) mask in *raster* order, one (query, key) pair at a time."""
    T, H, W = grid
    gt, gh, gw = groups
    n_valid = n_text if n_valid is None else n_valid
    n = T * H * W
    coords = [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]
    # criss-cross planes only along axes split into more than one group (T = 1: rows/columns)
    split = [size // g > 1 for size, g in zip(grid, groups)]
    split = split if any(split) else [True, True, True]
    L = n + n_text
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if j >= n + n_valid:  # pad text key: nobody
                continue
            if i >= n or j >= n:  # text query sees all valid keys; image query sees valid text
                m[i, j] = True
                continue
            (t1, h1, w1), (t2, h2, w2) = coords[i], coords[j]
            a = (t1 // gt, h1 // gh, w1 // gw)
            b = (t2 // gt, h2 // gh, w2 // gw)
            if variant == "criss_cross":
                m[i, j] = any(x == y for x, y, on in zip(a, b, split) if on)
            else:
                m[i, j] = all(abs(x - y) <= r for x, y, r in zip(a, b, radius))
    return m


def official_clusterify(x, grid, groups):
    """The official CrossAttnProcessor2_0.clusterify (OliverRensu/GRAT, cross_processor.py)."""
    bsz, head, _, c = x.shape
    (t, h, w), (p_t, p_h, p_w) = grid, groups
    x = x.reshape(bsz, head, t // p_t, p_t, h // p_h, p_h, w // p_w, p_w, c)
    x = torch.einsum("nxtahpwqc->nxthwapqc", x)
    return x.reshape(bsz, head, -1, c)


MASK_CASES = [
    ((2, 4, 6), (1, 2, 3), "criss_cross", 0, None, 1),
    ((2, 6, 4), (1, 3, 2), "criss_cross", 5, 3, 1),
    ((3, 4, 4), (1, 2, 2), "block", 4, None, 1),
    ((2, 6, 6), (1, 2, 2), "block", 3, 0, (0, 1, 2)),
    ((1, 5, 7), (1, 5, 1), "criss_cross", 2, 2, 1),
    ((4, 2, 3), (2, 1, 3), "block", 0, None, 0),
    ((1, 6, 8), (1, 2, 2), "criss_cross", 3, None, 1),  # image: rows and columns of groups
    ((2, 4, 6), (2, 2, 3), "criss_cross", 0, None, 1),  # one temporal group
    ((2, 4, 6), (2, 4, 6), "criss_cross", 2, None, 1),  # a single group
]


def mask_id(case):
    grid, groups, variant, n_text, n_valid, radius = case
    r = radius if isinstance(radius, int) else "x".join(map(str, radius))
    v = "" if n_valid is None else f"v{n_valid}"
    return (f"T{grid[0]}-H{grid[1]}-W{grid[2]}-g{'x'.join(map(str, groups))}-{variant}-r{r}"
            f"-text{n_text}{v}")


# ----------------------------------------------------------------------------------------------
# spec, permutation, mask, density, layout (pure torch)


@pytest.mark.parametrize("grid,groups", [((2, 6, 4), (1, 3, 2)), ((4, 8, 8), (2, 4, 4)),
                                         ((3, 5, 7), (3, 5, 7)), ((1, 1, 1), (1, 1, 1))])
def test_permutation_round_trip_and_official_layout(grid, groups):
    perm, inv = grat.group_permutation(*grid, *groups)
    n = grid[0] * grid[1] * grid[2]
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    x = torch.randn(2, 3, n, 5)
    assert torch.equal(x[:, :, perm], official_clusterify(x, grid, groups))
    spec = ref.make_spec(grid, groups, n_text=4)
    xt = torch.randn(2, 3, n + 4, 5)
    grouped = ref.to_grouped(xt, spec)
    assert torch.equal(grouped[:, :, n:], xt[:, :, n:])  # text stays at the end
    assert torch.equal(ref.from_grouped(grouped, spec), xt)


@pytest.mark.parametrize("case", MASK_CASES, ids=mask_id)
def test_mask_matches_brute_force_definition(case):
    grid, groups, variant, n_text, n_valid, radius = case
    r3 = (radius,) * 3 if isinstance(radius, int) else radius
    raster = brute_mask(grid, groups, variant, n_text, n_valid, r3)
    perm, _ = grat.group_permutation(*grid, *groups)
    full_perm = torch.cat([perm, torch.arange(perm.numel(), perm.numel() + n_text)])
    expected = raster[full_perm][:, full_perm]  # grouped order
    got = grat.grat_mask(*grid, *groups, variant, n_text, n_text_valid=n_valid, radius=radius)
    assert torch.equal(got, expected)
    spec = ref.make_spec(grid, groups, variant, n_text, n_valid, radius)
    assert grat.grat_density(spec) == pytest.approx(expected.double().mean().item(), abs=1e-12)


def test_criss_cross_density_formula_at_paper_scale():
    # HunyuanVideo 768x1280, 128 frames: latent grid (32, 48, 80), groups (4, 8, 8), 256 text slots
    spec = ref.make_spec((32, 48, 80), (4, 8, 8), n_text=256, n_text_valid=20)
    nt, nh, nw = spec.group_grid
    per_group = nh * nw + nt * nw + nt * nh - nt - nh - nw + 1
    image_pairs = spec.n_groups * per_group * spec.group_size**2
    assert (nt, nh, nw, per_group) == (8, 6, 10, 165)  # 165 of 480 key groups per query group
    assert image_pairs / spec.n_image**2 == pytest.approx(165 / 480)
    assert grat.grat_density(spec) == pytest.approx(0.3446, abs=1e-4)  # text adds a little
    # Flux 4096 x 4096 (256 x 256 tokens), 16 x 16 groups: 16 + 16 - 1 of 256 groups
    image = ref.make_spec((1, 256, 256), (1, 16, 16))
    assert grat.grat_density(image) == pytest.approx(31 / 256)


@pytest.mark.parametrize("case", MASK_CASES, ids=mask_id)
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), (8, 4)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_block_layout_is_exact_cover_of_mask(case, blocks):
    spec = ref.make_spec(*case)
    bm, bn = blocks
    mask = ref._spec_mask(spec)
    visit, full = block_matrices(spec, bm, bn)
    qb, kb = visit.shape
    padded = torch.zeros(qb * bm, kb * bn, dtype=torch.bool)
    padded[: spec.seq_len, : spec.seq_len] = mask
    tiles = padded.view(qb, bm, kb, bn)
    assert torch.equal(visit, tiles.any(3).any(1))  # every attended pair covered, no empty tile
    all_on = padded.clone()
    all_on[spec.seq_len :] = True  # rows past L are never stored
    assert not (full & ~all_on.view(qb, bm, kb, bn).all(3).all(1)).any()  # full => no mask needed
    lay = block_layout(spec, bm, bn)
    for row in range(qb):  # lists = matrices
        listed = set(lay.kv_full_idx[row, : lay.kv_full_cnt[row]].tolist())
        listed |= set(lay.kv_part_idx[row, : lay.kv_part_cnt[row]].tolist())
        assert listed == set(visit[row].nonzero().flatten().tolist())


def test_group_aligned_tiles_are_all_full():
    spec = ref.make_spec((4, 8, 8), (2, 4, 4), n_text=0)  # 32-token groups, 16-token tiles
    visit, full = block_matrices(spec, 16, 16)
    assert torch.equal(visit, full)
    assert 0 < visit.double().mean().item() < 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(2, 6, 4), groups=(1, 4, 2)), "does not divide"),
        (dict(grid=(2, 6, 4), groups=(1, 3, 2), variant="swin"), "known: criss_cross, block"),
        (dict(grid=(2, 6, 4), groups=(1, 3, 2), n_text=2, n_text_valid=3), "n_text_valid"),
        (dict(grid=(2, 6, 4), groups=(1, 3, 2), radius=-1), "radius"),
    ],
)
def test_spec_errors_say_what_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ref.make_spec(**kwargs)


def test_layout_sizes_scale_with_groups():
    """Tile density of the official setting is close to the token density (aligned groups)."""
    spec = ref.make_spec((16, 32, 64), (4, 8, 8), n_text=256, n_text_valid=40)
    lay = block_layout(spec, 128, 64)
    assert lay.block_density == pytest.approx(grat.grat_density(spec), rel=0.25)
    assert bool((lay.kv_full_cnt > 0).all())  # every query tile has unmasked work


# ----------------------------------------------------------------------------------------------
# reference and dispatcher


def _rand_qkv(B, Hh, L, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, Hh, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def test_reference_is_explicit_masked_softmax_in_raster_order():
    grid, groups, n_text = (2, 4, 6), (1, 2, 3), 5
    q, k, v = _rand_qkv(2, 3, 48 + n_text, 8, torch.float64)
    out = grat.grat_attention_reference(q, k, v, grid, groups, "criss_cross", n_text,
                                        n_text_valid=2)
    mask = brute_mask(grid, groups, "criss_cross", n_text, 2)  # raster order
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, expected)
    spec = ref.make_spec(grid, groups, "criss_cross", n_text, 2)
    grouped = grat.grat_attention_reference(*(ref.to_grouped(x, spec) for x in (q, k, v)), grid,
                                            groups, "criss_cross", n_text, n_text_valid=2,
                                            tokens_grouped=True)
    torch.testing.assert_close(grouped, ref.to_grouped(expected, spec))


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    q, k, v = _rand_qkv(1, 2, 48 + 3, 16)
    args = ((2, 6, 4), (1, 3, 2), "block", 3)
    expected = grat.grat_attention_reference(q, k, v, *args)
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    assert torch.equal(grat.grat_attention(q, k, v, *args), expected)
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    assert torch.equal(grat.grat_attention(q, k, v, *args), expected)
    monkeypatch.setenv("VGEN_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="known: auto, reference, triton"):
        grat.grat_attention(q, k, v, *args)


# ----------------------------------------------------------------------------------------------
# FlexAttention (official formulation)


def test_flex_mask_mod_matches_reference_mask():
    from torch.nn.attention.flex_attention import create_mask

    from kernels.grat.flex import grat_mask_mod

    for case in MASK_CASES:
        spec = ref.make_spec(*case)
        L = spec.seq_len
        dense = create_mask(grat_mask_mod(spec), None, None, L, L, device="cpu")
        assert torch.equal(dense[0, 0], ref._spec_mask(spec)), mask_id(case)


def test_flex_forward_on_cpu_matches_reference():
    grid, groups = (2, 6, 4), (1, 3, 2)
    q, k, v = _rand_qkv(2, 2, 48 + 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out = grat.grat_attention_flex(q, k, v, grid, groups, "criss_cross", 5, n_text_valid=3)
    expected = grat.grat_attention_reference(q, k, v, grid, groups, "criss_cross", 5,
                                             n_text_valid=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_is_refused_clearly():
    # torch 2.13: "FlexAttention does not support backward on CPU" (eager and compiled)
    q, k, v = (x.requires_grad_(True) for x in _rand_qkv(1, 1, 48, 16))
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        grat.grat_attention_flex(q, k, v, (2, 6, 4), (1, 3, 2))


# ----------------------------------------------------------------------------------------------
# Triton under the CPU interpreter


def _case(grid, groups, variant="criss_cross", radius=1, n_text=0, n_valid=None, D=16,
          dtype=torch.float32, B=1, Hh=2, tiles=None, scale=None, grouped=False):
    return dict(grid=grid, groups=groups, variant=variant, radius=radius, n_text=n_text,
                n_valid=n_valid, D=D, dtype=dtype, B=B, Hh=Hh, tiles=tiles, scale=scale,
                grouped=grouped)


TRITON_CASES = [
    _case((2, 6, 4), (1, 3, 2), n_text=5),
    _case((2, 6, 4), (1, 3, 2), "block", n_text=5, n_valid=3, D=24),
    _case((3, 4, 4), (1, 2, 2), B=2, Hh=1, tiles=dict(fwd=(32, 16, 1, 1), bwd=(16, 32, 1, 1))),
    _case((1, 5, 7), (1, 5, 1), "block", radius=(0, 0, 2), n_text=3, D=40, Hh=1),
    _case((4, 2, 6), (2, 1, 3), "block", radius=0, D=8),
    _case((2, 8, 8), (1, 4, 4), n_text=7, n_valid=2, dtype=torch.float16),  # tile-aligned groups
    _case((2, 4, 6), (1, 2, 3), "block", n_text=9, n_valid=0, D=32, dtype=torch.float16, Hh=1),
    _case((2, 6, 4), (1, 3, 2), n_text=4, scale=0.3, grouped=True),
    _case((1, 8, 6), (1, 2, 3), n_text=2, D=16, Hh=1),  # image (T = 1): 2D criss-cross
    _case((2, 4, 4), (1, 2, 2), n_text=3, dtype=torch.bfloat16, Hh=1),
]

_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def triton_id(c):
    g, grp = c["grid"], c["groups"]
    v = "" if c["n_valid"] is None else f"v{c['n_valid']}"
    r = c["radius"] if isinstance(c["radius"], int) else "x".join(map(str, c["radius"]))
    variant = "cc" if c["variant"] == "criss_cross" else f"blk{r}"
    extra = "" if c["tiles"] is None else f"-tiles{c['tiles']['fwd'][0]}x{c['tiles']['fwd'][1]}"
    extra += "" if c["scale"] is None else f"-scale{c['scale']}"
    extra += "-grouped" if c["grouped"] else ""
    return (f"T{g[0]}-H{g[1]}-W{g[2]}-g{'x'.join(map(str, grp))}-text{c['n_text']}{v}-D{c['D']}"
            f"-{variant}-B{c['B']}H{c['Hh']}-{str(c['dtype']).removeprefix('torch.')}{extra}")


def _compare(attention, c, device="cpu", **extra):
    """Outputs and (q, k, v) gradients of ``attention`` and of the fp64 reference (same inputs,
    same dO); returns (got, want), each [out, dq, dk, dv]."""
    spec = ref.make_spec(c["grid"], c["groups"], c["variant"], c["n_text"], c["n_valid"],
                         c["radius"])
    q, k, v = _rand_qkv(c["B"], c["Hh"], spec.seq_len, c["D"], c["dtype"], device)
    if c["grouped"]:
        q, k, v = (ref.to_grouped(x, spec) for x in (q, k, v))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    args = (c["grid"], c["groups"], c["variant"], c["n_text"])
    kwargs = dict(n_text_valid=c["n_valid"], radius=c["radius"], scale=c["scale"],
                  tokens_grouped=c["grouped"])
    out = attention(q, k, v, *args, **kwargs, **extra)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out64 = grat.grat_attention_reference(q64, k64, v64, *args, **kwargs)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    return [out, *grads], [out64, *grads64]


def _interpreter_worker() -> None:
    """Subprocess entry point (TRITON_INTERPRET=1 was set before triton was imported): run every
    TRITON_CASES entry, print one JSON line per case with the max abs errors."""
    from kernels.grat import triton as grat_triton

    for c in TRITON_CASES:
        row = {"id": triton_id(c)}
        if c["dtype"] == torch.bfloat16:
            print(json.dumps(row | {"skipped": True}), flush=True)
            continue
        try:
            got, want = _compare(grat_triton.grat_attention, c, _blocks=c["tiles"])
            row["dtypes"] = [str(g.dtype) for g in got]
            row["errors"] = [(g.double() - w).abs().max().item() for g, w in zip(got, want)]
            row["scales"] = [w.abs().max().item() for w in want]
        except Exception:  # reported by the test of this case
            row["error"] = traceback.format_exc()
        print(json.dumps(row), flush=True)


@pytest.fixture(scope="session")
def interpreter_results():
    """Run the interpreter cases in one subprocess: triton.jit (also for tl.zeros & co in
    triton.language) chooses interpreter or compiler when triton is imported, so
    TRITON_INTERPRET=1 has to be set before that, whatever this process imported already."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not rows:
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {row["id"]: row for row in rows}


@pytest.mark.parametrize("case", TRITON_CASES, ids=triton_id)
def test_triton_interpreter_matches_reference(interpreter_results, case):
    if case["dtype"] == torch.bfloat16:
        pytest.skip("the Triton interpreter multiplies raw bf16 bits in tl.dot "
                    "(triton-lang/triton#11584, unsupported); bf16 is checked on GPU")
    row = interpreter_results.get(triton_id(case))
    assert row is not None, "case missing from the interpreter worker's output"
    assert "error" not in row, row.get("error")
    assert row["dtypes"] == [str(case["dtype"])] * 4
    tol = _TOL[case["dtype"]]
    for name, err, scale in zip(("out", "dq", "dk", "dv"), row["errors"], row["scales"]):
        assert err <= tol * max(1.0, scale), f"{name}: max |triton - fp64 reference| = {err:.3g}"


# ----------------------------------------------------------------------------------------------
# GPU: realistic sizes (skipped without CUDA by tests/conftest.py)

GPU_CASES = [
    _case((8, 24, 32), (2, 8, 8), n_text=77, n_valid=20, D=64, dtype=torch.bfloat16, Hh=4),
    _case((8, 24, 32), (2, 8, 8), n_text=77, n_valid=20, D=128, dtype=torch.float16, B=2),
    _case((6, 30, 40), (2, 5, 8), "block", n_text=64, D=128, dtype=torch.bfloat16),
    _case((5, 18, 22), (1, 3, 11), n_text=13, D=72, dtype=torch.float16, Hh=3),
    _case((4, 16, 16), (4, 8, 8), "block", radius=(0, 1, 1), D=64, dtype=torch.float32),
    _case((4, 16, 16), (1, 4, 8), n_text=8, D=32, dtype=torch.float16, scale=0.2, grouped=True),
    _case((1, 64, 96), (1, 16, 16), n_text=32, n_valid=9, D=64, dtype=torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=triton_id)
def test_triton_gpu_matches_reference(case):
    from kernels.grat import triton as grat_triton

    got, want = _compare(grat_triton.grat_attention, case, "cuda")
    # FlashAttention-style bound: the kernel may err at most ~2x the reference run in `dtype`
    lp = dict(case, grouped=False, scale=case["scale"])
    q, k, v = _rand_qkv(case["B"], case["Hh"], got[0].shape[2], case["D"], case["dtype"], "cuda")
    spec = ref.make_spec(case["grid"], case["groups"], case["variant"], case["n_text"],
                         case["n_valid"], case["radius"])
    if case["grouped"]:
        q, k, v = (ref.to_grouped(x, spec) for x in (q, k, v))
    out_lp = grat.grat_attention_reference(
        q, k, v, lp["grid"], lp["groups"], lp["variant"], lp["n_text"], n_text_valid=lp["n_valid"],
        radius=lp["radius"], scale=lp["scale"], tokens_grouped=case["grouped"])
    bound = 2 * (out_lp.double() - want[0]).abs().max().item() + 1e-4
    err = (got[0].double() - want[0]).abs().max().item()
    assert err <= bound, f"out: max error {err:.3g} > 2x the low-precision reference's {bound:.3g}"
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[case["dtype"]]
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        scale = w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        assert err <= tol * max(scale, 1.0), f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.gpu
def test_triton_gpu_matches_flex_at_32k_tokens():
    from kernels.grat import triton as grat_triton

    grid, groups, n_text = (16, 32, 64), (4, 8, 8), 256  # 32768 image tokens, official groups
    q, k, v = _rand_qkv(1, 4, 32768 + n_text, 128, torch.bfloat16, "cuda")
    kwargs = dict(n_text_valid=40)
    out = grat_triton.grat_attention(q, k, v, grid, groups, "criss_cross", n_text, **kwargs)
    flex = grat.grat_attention_flex(q, k, v, grid, groups, "criss_cross", n_text, **kwargs)
    torch.testing.assert_close(out.float(), flex.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_dispatcher_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    q, k, v = _rand_qkv(1, 2, 1024, 64, torch.float16, "cuda")
    out = grat.grat_attention(q, k, v, (4, 16, 16), (1, 8, 8))
    want = grat.grat_attention_reference(q.float(), k.float(), v.float(), (4, 16, 16), (1, 8, 8))
    torch.testing.assert_close(out.float(), want, atol=5e-3, rtol=5e-3)


if __name__ == "__main__":
    _interpreter_worker()
