"""Shared generator building blocks (vgen_core.generators.common) and the no-cross-private-import
rule between generator modules."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vgen_core.generators as generators_pkg
from vgen_core.generators.common import (
    BertBlock,
    CausalSelfAttention,
    KVCache,
    Mlp,
    RMSNorm,
    SwiGLU,
    SwiGLUFFN,
    adaln_modulation,
    apply_rope_half,
    apply_rope_interleaved,
    attention,
    gumbel_noise,
    modulate,
    register_attention_backend,
    rms_norm,
    rope_1d_angles,
    rope_2d_angles,
    rope_frequencies,
    rotate_half,
    rotate_interleaved,
    swiglu_hidden,
)

GENERATORS_DIR = Path(generators_pkg.__file__).parent
PACKAGE = "vgen_core.generators"


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# import rule
# --------------------------------------------------------------------------------------------------


def _private_cross_imports(path: Path) -> list[str]:
    """`from vgen_core.generators.<other> import _x` and `<other module alias>._x` uses."""
    tree = ast.parse(path.read_text())
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PACKAGE + ".") and node.module != f"{PACKAGE}.{path.stem}":
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if node.module == PACKAGE:  # from vgen_core.generators import rar
                module_aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + ".") and a.asname:
                    module_aliases.add(a.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_generator_module_imports_another_ones_private_names():
    modules = sorted(GENERATORS_DIR.glob("*.py"))
    assert len(modules) > 5
    offenders = {p.name: names for p in modules if (names := _private_cross_imports(p))}
    assert offenders == {}, f"private cross-module imports: {offenders}"


def test_the_import_rule_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from vgen_core.generators.rar import _raster, sample\n"
        "from vgen_core.generators import masked\n"
        "x = masked._gumbel\n"
    )
    assert _private_cross_imports(bad) == ["vgen_core.generators.rar._raster", "masked._gumbel"]


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def test_attention_defaults_to_sdpa_with_masks_causal_and_scale():
    q, k, v = (torch.randn(2, 3, 5, 8, generator=_g(i)) for i in range(3))
    mask = torch.rand(5, 5, generator=_g(3)) > 0.3
    mask.fill_diagonal_(True)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(attention(q, k, v, mask=mask),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(attention(q, k, v, causal=True),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(attention(q, k, v, scale=0.5),
                       F.scaled_dot_product_attention(q, k, v, scale=0.5))


def test_attention_backend_hook():
    q, k, v = (torch.randn(1, 2, 4, 8, generator=_g(i)) for i in range(3))
    calls = []

    def fake(q, k, v, *, mask, causal, dropout_p, scale, tag):
        calls.append((causal, tag))
        return torch.zeros_like(q)

    assert torch.equal(attention(q, k, v, causal=True, backend=fake, tag=1), torch.zeros_like(q))
    register_attention_backend("test_fake", fake)
    attention(q, k, v, backend="test_fake", tag=2)
    assert calls == [(True, 1), (False, 2)]
    with pytest.raises(ValueError, match="known: sdpa, grat"):
        attention(q, k, v, backend="nope")


def test_attention_grat_backend_dispatches_to_the_kernel_op():
    from kernels.grat import grat_attention

    grid, groups = (1, 4, 4), (1, 2, 2)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=_g(i)) for i in range(3))
    out = attention(q, k, v, backend="grat", grid=grid, groups=groups, variant="criss_cross")
    torch.testing.assert_close(out, grat_attention(q, k, v, grid, groups, "criss_cross"))
    with pytest.raises(ValueError, match="not supported"):
        attention(q, k, v, causal=True, backend="grat", grid=grid, groups=groups)


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------


def test_rope_tables_by_hand():
    # theta 100, dim 4: frequencies 100^0 = 1, 100^(-2/4) = 0.1
    torch.testing.assert_close(rope_frequencies(4, 100.0), torch.tensor([1.0, 0.1]))
    assert torch.equal(rope_1d_angles(torch.tensor([2.0]), torch.tensor([1.0, 0.5])),
                       torch.tensor([[2.0, 1.0]]))
    # head_dim 8 -> d/2 = 4 channels per axis, 2 frequencies, each for an interleaved pair
    ang = rope_2d_angles(torch.tensor([2.0]), torch.tensor([3.0]), 8, theta=100.0)
    torch.testing.assert_close(ang, torch.tensor([[2.0, 2.0, 0.2, 0.2, 3.0, 3.0, 0.3, 0.3]]))
    assert rope_2d_angles(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                          8).dtype == torch.float64


def test_rotations_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_interleaved(x), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
    assert torch.equal(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_apply_rope_is_a_complex_rotation(layout):
    x = torch.randn(2, 3, 5, 8, generator=_g(0), dtype=torch.float64)
    theta = torch.rand(5, 4, generator=_g(1), dtype=torch.float64) * 6
    if layout == "interleaved":
        cos, sin = theta.repeat_interleave(2, -1).cos(), theta.repeat_interleave(2, -1).sin()
        out = apply_rope_interleaved(x, cos, sin)
        z, z_out = torch.view_as_complex(x.unflatten(-1, (4, 2))), out.unflatten(-1, (4, 2))
    else:
        cos, sin = theta.repeat(1, 2).cos(), theta.repeat(1, 2).sin()
        out = apply_rope_half(x, cos, sin)
        z = torch.complex(x[..., :4], x[..., 4:])
        z_out = torch.stack([out[..., :4], out[..., 4:]], -1)
    torch.testing.assert_close(torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)),
                               z_out)


def test_apply_rope_upcast_keeps_the_input_dtype():
    x = torch.randn(1, 1, 3, 8, generator=_g(0)).bfloat16()
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    out = apply_rope_interleaved(x, cos, sin, upcast=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
    assert apply_rope_interleaved(x, cos, sin).dtype == torch.float32  # no upcast: promotion


# --------------------------------------------------------------------------------------------------
# norms, MLPs, adaLN, blocks
# --------------------------------------------------------------------------------------------------


def test_rms_norm_and_module():
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt(12.5)
    torch.testing.assert_close(rms_norm(x, eps=0.0), x / math.sqrt(12.5))
    norm = RMSNorm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(norm(x), torch.tensor([[6.0, 4.0]]) / math.sqrt(12.5), rtol=1e-6,
                               atol=1e-6)
    assert list(norm.state_dict()) == ["weight"]
    assert rms_norm(x.bfloat16()).dtype == torch.bfloat16


def test_modulate_and_adaln_modulation():
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(modulate(x, torch.tensor([1.0, 0.0]), torch.tensor([1.0, -0.5])),
                       torch.tensor([3.0, 1.0]))
    ada = adaln_modulation(4, 3)
    assert list(ada.state_dict()) == ["1.weight", "1.bias"] and ada[1].out_features == 12


def test_mlp_variants_and_state_keys():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    mlp = Mlp(4, 8, 3, approximate="tanh", drop=0.0).train()
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert torch.equal(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
    fused = SwiGLUFFN(4, 6)
    assert list(fused.state_dict()) == ["w12.weight", "w12.bias", "w3.weight", "w3.bias"]
    a, b = fused.w12(x).chunk(2, -1)
    assert torch.equal(fused(x), fused.w3(F.silu(a) * b))
    split = SwiGLU(4, 6)
    assert [k.split(".")[0] for k in split.state_dict()][::2] == ["fc1_g", "fc1_x", "fc2"]
    assert torch.equal(split(x), split.fc2(F.silu(split.fc1_g(x)) * split.fc1_x(x)))
    assert swiglu_hidden(64) == 170 and swiglu_hidden(768) == 2048


def test_bert_block_is_post_norm():
    torch.manual_seed(0)
    blk = BertBlock(16, 2, 32, eps=1e-12).eval()
    assert [k.rsplit(".", 1)[0] for k in blk.state_dict()][::2] == [
        "qkv", "proj", "norm1", "fc1", "fc2", "norm2"
    ]
    x = torch.randn(2, 5, 16)
    q, k, v = blk.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    h = blk.norm1(x + blk.proj(a))
    torch.testing.assert_close(blk(x), blk.norm2(h + blk.fc2(F.gelu(blk.fc1(h)))))


def test_causal_attention_with_kv_cache_matches_the_full_pass():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, torch.nn.LayerNorm, 0.0, 0.0).eval()
    x = torch.randn(2, 6, 16)
    full = attn(x)
    cache = KVCache(1)
    parts = [attn(x[:, :3], cache.layers[0]), attn(x[:, 3:5], cache.layers[0]),
             attn(x[:, 5:], cache.layers[0])]
    assert cache.length == 6
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)


def test_gumbel_noise():
    a = gumbel_noise((4, 5), generator=_g(0))
    assert a.shape == (4, 5) and torch.equal(a, gumbel_noise((4, 5), generator=_g(0)))
    big = gumbel_noise((200_000,), generator=_g(1))
    assert torch.isfinite(big).all()
    assert float(big.mean()) == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni constant
