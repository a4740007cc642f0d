"""MaskBit LFQ tokenizer: bit codecs, entropies, quantizer, autoencoder, export, tiny training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from vgen_core.tokenizers import (
    LFQ_SIZES,
    LFQConfig,
    LookupFreeQuantizer,
    avg_entropy,
    bits_to_indices,
    entropy_anneal_multiplier,
    indices_to_bits,
    lfq_config,
    load_pretrained,
    pack_bits,
    per_sample_entropy,
    save_pretrained,
    unpack_bits,
    weights_digest,
)
from vgen_core.tokenizers.lfq import _AvgEntropyChunked, _avg_entropy_dense, _ResBlock



def _dense_entropies(z_NK: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook definition: softmax(2 z.c / T) over the explicit {-1,+1}^K codebook."""
    K = z_NK.shape[-1]
    codes_VK = indices_to_bits(torch.arange(2**K), K).to(z_NK.dtype) * 2 - 1
    logp_NV = torch.log_softmax(2.0 * z_NK @ codes_VK.T / T, dim=-1)
    p_NV = logp_NV.exp()
    per_sample = -(p_NV * logp_NV).sum(-1).mean()
    avg_V = p_NV.mean(0)
    return per_sample, -(avg_V * avg_V.log()).sum()


# --------------------------------------------------------------------------------------------------
# bits <-> indices <-> bytes
# --------------------------------------------------------------------------------------------------


def test_index_of_known_sign_pattern_is_lsb_first():
    bits = torch.tensor([True, False, True, True])
    assert bits_to_indices(bits).item() == 1 + 4 + 8
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0])
    assert bits_to_indices(signs).item() == 13
    assert bits_to_indices(torch.tensor([0.0, 0.3, -2.0])).item() == 2  # 0 counts as "not set"
    assert indices_to_bits(torch.tensor(13), 4).tolist() == [True, False, True, True]
    assert indices_to_bits(torch.tensor([0, 2**12 - 1]), 12).sum(-1).tolist() == [0, 12]
    assert bits_to_indices(indices_to_bits(torch.tensor(2**40 + 5), 41)).item() == 2**40 + 5


def test_indices_to_bits_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*4\)"):
        indices_to_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError):
        indices_to_bits(torch.tensor([-1]), 4)
    with pytest.raises(TypeError):
        indices_to_bits(torch.tensor([1.0]), 4)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 30), data=st.data())
def test_indices_bits_round_trip(k, data):
    idx = data.draw(st.lists(st.integers(0, 2**k - 1), min_size=1, max_size=20))
    idx_N = torch.tensor(idx, dtype=torch.int64)
    bits_NK = indices_to_bits(idx_N, k)
    assert bits_NK.shape == (len(idx), k) and bits_NK.dtype == torch.bool
    assert torch.equal(bits_to_indices(bits_NK), idx_N)


@settings(max_examples=60, deadline=None)
@given(
    bits=hnp.arrays(
        np.bool_, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5).map(lambda s: s + (7,))
    )
)
def test_bits_indices_round_trip_from_bits(bits):
    bits_t = torch.from_numpy(bits)
    assert torch.equal(indices_to_bits(bits_to_indices(bits_t), 7), bits_t)


@settings(max_examples=80, deadline=None)
@given(
    k=st.integers(1, 40),
    lead=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    data=st.data(),
)
def test_pack_unpack_round_trip(k, lead, data):
    bits = data.draw(hnp.arrays(np.bool_, tuple(lead) + (k,)))
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.shape == tuple(lead) + ((k + 7) // 8,)
    np.testing.assert_array_equal(unpack_bits(packed, k), bits)
    packed_t = pack_bits(torch.from_numpy(bits))
    assert isinstance(packed_t, torch.Tensor)
    assert torch.equal(unpack_bits(packed_t, k), torch.from_numpy(bits))


def test_pack_bits_is_little_endian_index_order():
    idx = torch.tensor([0, 1, 13, 200, 255])
    np.testing.assert_array_equal(pack_bits(indices_to_bits(idx, 8).numpy())[:, 0], idx.numpy())
    idx12 = torch.tensor([0, 1, 2047, 2048, 4095, 3000])
    packed = pack_bits(indices_to_bits(idx12, 12).numpy())
    assert packed.shape == (6, 2)
    np.testing.assert_array_equal(packed.view("<u2")[:, 0], idx12.numpy())


def test_unpack_bits_checks_width_and_dtype():
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_bits(np.zeros((3, 1), np.uint8), 12)
    with pytest.raises(TypeError):
        unpack_bits(np.zeros((3, 2), np.int32), 12)
    with pytest.raises(TypeError):
        pack_bits(np.zeros((3, 2), np.int32))


# --------------------------------------------------------------------------------------------------
# entropy terms
# --------------------------------------------------------------------------------------------------


def test_entropies_at_zero_input_are_k_ln2():
    z = torch.zeros(5, 6)
    assert per_sample_entropy(z, 0.01).item() == pytest.approx(6 * math.log(2), rel=1e-6)
    assert avg_entropy(z, 0.01).item() == pytest.approx(6 * math.log(2), rel=1e-6)
    assert _AvgEntropyChunked.apply(z, 0.01, 7).item() == pytest.approx(6 * math.log(2), rel=1e-6)


def test_confident_tokens_covering_every_code_once():
    K = 4
    z_NK = (indices_to_bits(torch.arange(2**K), K).float() * 2 - 1) * 0.5  # one token per code
    assert per_sample_entropy(z_NK, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    assert avg_entropy(z_NK, 0.01).item() == pytest.approx(K * math.log(2), rel=1e-5)
    assert avg_entropy(z_NK[:1].repeat(8, 1), 0.01).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.3, 0.01])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 3), (33, 6)], ids=lambda v: str(v))
def test_factorised_and_chunked_match_textbook(N, K, T):
    z = torch.randn(N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(N * K))
    z.requires_grad_(True)
    ref_ps, ref_avg = _dense_entropies(z, T)
    g_ps_ref = torch.autograd.grad(ref_ps, z, retain_graph=True)[0]
    g_avg_ref = torch.autograd.grad(ref_avg, z)[0]
    ps = per_sample_entropy(z, T)
    torch.testing.assert_close(ps, ref_ps)
    torch.testing.assert_close(torch.autograd.grad(ps, z)[0], g_ps_ref)
    for fn in (lambda z: _avg_entropy_dense(z, T), lambda z: _AvgEntropyChunked.apply(z, T, 5)):
        avg = fn(z)
        torch.testing.assert_close(avg, ref_avg)
        torch.testing.assert_close(torch.autograd.grad(avg, z)[0], g_avg_ref, rtol=1e-6, atol=1e-9)


def test_chunked_avg_entropy_gradcheck():
    z = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    def fn(z: torch.Tensor) -> torch.Tensor:
        return _AvgEntropyChunked.apply(z, 0.5, 6)

    assert torch.autograd.gradcheck(fn, (z.requires_grad_(),))


def test_avg_entropy_dispatches_to_chunks_for_large_k():
    z = torch.randn(64, 14, generator=torch.Generator().manual_seed(1)) * 0.01
    z.requires_grad_(True)
    out = avg_entropy(z, 0.01, chunk_size=1024)  # 16 chunks of the 16384 codes
    assert out.grad_fn is not None and "AvgEntropyChunked" in type(out.grad_fn).__name__
    ref = _avg_entropy_dense(z.detach().double(), 0.01)
    assert out.item() == pytest.approx(ref.item(), rel=1e-4)


def test_entropy_anneal_multiplier():
    assert entropy_anneal_multiplier(0) == 3.0
    assert entropy_anneal_multiplier(1000) == 2.0
    assert entropy_anneal_multiplier(2000) == 1.0
    assert entropy_anneal_multiplier(10**6) == 1.0
    assert entropy_anneal_multiplier(5, factor=0.0) == 1.0


# --------------------------------------------------------------------------------------------------
# quantizer
# --------------------------------------------------------------------------------------------------


def test_quantizer_outputs_commitment_and_ste():
    q = LookupFreeQuantizer(token_bits=3).eval()
    z = torch.full((2, 3, 4, 5), 0.5)
    z[:, 1] = -0.5
    z.requires_grad_(True)
    quant, bits, idx, losses = q(z)
    assert quant.shape == (2, 3, 4, 5) and bits.shape == (2, 4, 5, 3) and idx.shape == (2, 4, 5)
    assert torch.equal(quant.detach(), torch.where(z > 0, 1.0, -1.0))
    assert bits.dtype == torch.bool and idx.dtype == torch.int64
    assert (idx == 0b101).all()
    assert losses["commitment"].item() == pytest.approx(0.25 * 0.25)
    assert losses["entropy"].item() == 0.0  # eval mode: no entropy term, as in the official code
    (quant * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    # identity straight-through gradient
    torch.testing.assert_close(z.grad, torch.arange(3.0).view(1, 3, 1, 1).expand_as(z))


def test_quantizer_entropy_term_in_training():
    q = LookupFreeQuantizer(token_bits=5, entropy_weight=0.02, entropy_gamma=0.7).train()
    z = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.02
    _, _, _, losses = q(z)
    z_NK = z.permute(0, 2, 3, 1).reshape(-1, 5)
    ps, avg = _dense_entropies(z_NK.double(), 0.01)
    assert losses["per_sample_entropy"].item() == pytest.approx(ps.item(), rel=1e-4)
    assert losses["avg_entropy"].item() == pytest.approx(avg.item(), rel=1e-4)
    expected = 0.02 * (ps - 0.7 * avg).item()
    assert losses["entropy"].item() == pytest.approx(expected, rel=1e-3, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_size_registry():
    for k in (10, 12, 14, 16, 18):
        cfg = LFQ_SIZES[f"maskbit-k{k}"]
        arch = (cfg.hidden, cfg.ch_mult, cfg.token_bits, cfg.downsample_factor)
        assert arch == (128, (1, 1, 2, 2, 4), k, 16)
        weights = (cfg.commitment_weight, cfg.entropy_weight, cfg.entropy_temperature)
        assert weights == (0.25, 0.02, 0.01)
        assert (cfg.entropy_anneal_factor, cfg.entropy_anneal_steps) == (2.0, 2000)
        assert cfg.shortcut == "official"  # loads released MaskBit weights (maskbit_keys.py)
    assert LFQ_SIZES["tiny"].downsample_factor == 4
    assert LFQ_SIZES["tiny"].shortcut == LFQConfig().shortcut == "official"
    assert lfq_config("tiny", shortcut="input").shortcut == "input"
    with pytest.raises(ValueError, match="shortcut"):
        LFQConfig(shortcut="output")
    assert lfq_config("tiny", token_bits=6).token_bits == 6
    with pytest.raises(ValueError, match="known: tiny"):
        lfq_config("huge")
    with pytest.raises(ValueError, match="norm_groups"):
        LFQConfig(hidden=20, norm_groups=8)


def test_res_block_shortcut_modes():
    """"official": MaskBit's bias-free (out, out) conv on the block output, h + W h; "input": an
    (out, in) conv on the block input, W x + h; equal widths: x + h, identical parameters."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    off, inp = _ResBlock(8, 16, 4, "official"), _ResBlock(8, 16, 4, "input")
    assert off.nin_shortcut.weight.shape == (16, 16, 1, 1) and off.nin_shortcut.bias is None
    assert inp.shortcut.weight.shape == (16, 8, 1, 1) and inp.nin_shortcut is None
    assert {k for k in off.state_dict() if "shortcut" in k} == {"nin_shortcut.weight"}
    assert {k for k in inp.state_dict() if "shortcut" in k} == {"shortcut.weight"}
    inp.load_state_dict({k: v for k, v in off.state_dict().items() if "shortcut" not in k},
                        strict=False)

    def branch(block: _ResBlock) -> torch.Tensor:
        return block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))

    with torch.no_grad():
        h = branch(off)
        torch.testing.assert_close(off(x), h + F.conv2d(h, off.nin_shortcut.weight))
        torch.testing.assert_close(inp(x), F.conv2d(x, inp.shortcut.weight) + h)
        same = [_ResBlock(8, 8, 4, mode) for mode in ("official", "input")]
        same[1].load_state_dict(same[0].state_dict())  # same keys
        torch.testing.assert_close(same[0](x), x + branch(same[0]))
        torch.testing.assert_close(same[1](x), same[0](x))
    assert [k for k in lfq_config("tiny").build().state_dict() if "shortcut" in k] == [
        "encoder.3.0.nin_shortcut.weight", "decoder.6.0.nin_shortcut.weight"
    ]


def test_tokenizer_shapes_and_decode_paths():
    torch.manual_seed(0)
    model = lfq_config("tiny", token_bits=6).build().eval()
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        quant, bits, idx, _ = model.encode(images)
        assert quant.shape == (2, 6, 8, 6) and bits.shape == (2, 8, 6, 6) and idx.shape == (2, 8, 6)
        assert torch.equal(idx, bits_to_indices(bits)) and int(idx.max()) < 64
        recon = model.decode(quant)
        assert recon.shape == images.shape
        torch.testing.assert_close(model.decode_bits(bits), recon)
        torch.testing.assert_close(model.decode_indices(idx), recon)
    with pytest.raises(ValueError, match="multiple of the downsample factor 4"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError):
        model.decode_bits(bits.float())


def test_forward_losses_follow_annealing():
    torch.manual_seed(0)
    model = lfq_config("tiny").build().train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for step, mult in [(0, 3.0), (1000, 2.0), (2000, 1.0)]:
        torch.manual_seed(1)
        _, losses = model(images, step=step)
        assert {"commitment", "entropy", "total_quant"} <= set(losses)
        expected = losses["commitment"] + mult * losses["entropy"]
        torch.testing.assert_close(losses["total_quant"], expected)
        assert losses["entropy_multiplier"].item() == mult


def test_gradients_reach_encoder_through_ste():
    torch.manual_seed(0)
    model = lfq_config("tiny").build().train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _ = model(images)
    F.mse_loss(recon, images).backward()  # reconstruction only: must pass the sign() via STE
    first_conv = model.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_chunked_entropy_path_matches_dense_in_model():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grads, totals = [], []
    for chunk in (4096, 16):
        torch.manual_seed(0)
        model = lfq_config("tiny", entropy_chunk_size=chunk).build().train()
        _, losses = model(images)
        losses["total_quant"].backward()
        totals.append(losses["total_quant"].detach())
        grads.append(model.encoder[0].weight.grad.clone())
    torch.testing.assert_close(totals[0], totals[1])
    # fp32 with T=0.01 loses digits in both paths (each is ~3e-4 from an fp64 reference), so
    # compare whole-tensor relative error rather than elementwise.
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 2e-3


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = lfq_config("tiny", token_bits=7).build().eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out_dir = save_pretrained(model, tmp_path / "tok")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["family"] == "lfq" and cfg["token_bits"] == 7 and cfg["shortcut"] == "official"
    assert cfg["weights_digest"] == weights_digest(model)
    loaded = load_pretrained(out_dir, expected_family="lfq")
    assert loaded.config == model.config and not loaded.training
    assert weights_digest(loaded) == weights_digest(model)
    with torch.no_grad():
        assert torch.equal(loaded(images)[0], model(images)[0])
    with pytest.raises(ValueError, match="holds a 'lfq' model"):
        load_pretrained(out_dir, expected_family="maskgit")


def test_digest_detects_changes_and_tampering(tmp_path):
    torch.manual_seed(0)
    model = lfq_config("tiny").build()
    d0 = weights_digest(model)
    assert len(d0) == 64 and d0 == weights_digest(model)
    with torch.no_grad():
        model.decoder[-1].bias[0] += 1e-3
    assert weights_digest(model) != d0
    out_dir = save_pretrained(model, tmp_path / "tok")
    state = load_file(str(out_dir / "model.safetensors"))
    key = f"decoder.{len(model.decoder) - 1}.bias"
    state[key] = state[key] + 1
    save_file(state, str(out_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="digest"):
        load_pretrained(out_dir)


@pytest.mark.parametrize("shortcut", ["official", "input"])
def test_tiny_training_reduces_reconstruction_error(one_thread, shortcut):
    """Golden curve: 150 Adam steps on 4 fixed 32x32 patterns. Measured (1 thread), eval-mode MSE
    after training from ~0.65 at init, and distinct codes among the 256 tokens:
        official  seed 0: 0.023, 112 codes   seeds 0-4: MSE 0.011-0.023, 111-126 codes
        input     seed 0: 0.012, 126 codes   seeds 0-4: MSE 0.011-0.019, 112-147 codes
    The bounds leave >= 2x margin on MSE (13x below the init error) and ~3.5x on codes."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.stack(
        [
            torch.stack(
                [
                    torch.sin(math.pi * (1 + i) * xx),
                    torch.cos(math.pi * (2 + i % 3) * yy),
                    ((xx**2 + yy**2) < (0.3 + 0.15 * i) ** 2).float() * 2 - 1,
                ]
            )
            for i in range(4)
        ]
    ) * 0.9
    torch.manual_seed(0)
    model = lfq_config("tiny", shortcut=shortcut).build().train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(150):
        recon, losses = model(images, step=step)
        loss = F.mse_loss(recon, images) + losses["total_quant"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        mse = F.mse_loss(model(images)[0], images).item()
        idx = model.encode(images)[2]
    assert mse < 0.05, mse
    assert idx.unique().numel() > 32  # the entropy term keeps many codes in use
