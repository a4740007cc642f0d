"""DeltaTok and its frozen DINOv3-style VFM: shapes, loss, shared RoPE, loading, tiny training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vgen_core.tokenizers import load_pretrained, save_pretrained, weights_digest
from vgen_core.tokenizers import io as tok_io
from vgen_core.tokenizers.deltatok import (
    DELTATOK_SIZES,
    VFM_SIZES,
    DeltaTok,
    DeltaTokConfig,
    FrozenViT,
    VFMConfig,
    deltatok_config,
    dinov3_to_vgen,
    load_deltatok,
    load_vfm,
    log_cosh_loss,
    patch_coords,
    vfm_config,
    vgen_to_dinov3,
)



def _tiny(**overrides) -> DeltaTok:
    torch.manual_seed(0)
    return deltatok_config("tiny", **overrides).build().eval()


def _feats(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# configs, sizes, shapes
# --------------------------------------------------------------------------------------------------


def test_size_registry_and_validation():
    b = DELTATOK_SIZES["deltatok-b16"]
    assert (b.hidden_size, b.num_layers, b.num_heads, b.intermediate_size) == (768, 12, 12, 2048)
    assert (b.layer_scale_init, b.qk_norm, b.gated_attn, b.swiglu) == (1e-5, True, True, True)
    v = VFM_SIZES["dinov3-vitb16"]
    assert (v.patch_size, v.hidden_size, v.num_layers, v.num_heads) == (16, 768, 12, 12)
    assert (v.intermediate_size, v.num_register_tokens, v.gated_mlp) == (3072, 4, False)
    assert VFM_SIZES["tiny"].hidden_size == DELTATOK_SIZES["tiny"].hidden_size
    assert deltatok_config("tiny", num_layers=1).num_layers == 1
    with pytest.raises(ValueError, match="known: deltatok-b16, tiny"):
        deltatok_config("huge")
    with pytest.raises(ValueError, match="known: dinov3-vitb16, tiny"):
        vfm_config("huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        DeltaTokConfig(hidden_size=60, num_heads=6)
    with pytest.raises(ValueError, match="num_channels"):
        VFMConfig(num_channels=1)


def _vit_params(D: int, L: int, mlp: int, *, gated: bool, qk: bool, gate_heads: int) -> int:
    attn = 4 * D * D + 3 * D + (2 * (D // gate_heads) if qk else 0)
    attn += D * gate_heads + gate_heads if gated else 0
    ffn = (3 if gated else 2) * D * mlp + (2 if gated else 1) * mlp + D
    return L * (attn + ffn + 4 * D + 2 * D)


@pytest.mark.parametrize("size", ["dinov3-vitb16", "tiny"])
def test_vfm_shapes_on_meta(size):
    cfg = VFM_SIZES[size]
    with torch.device("meta"):
        vfm = cfg.build()
    H, W = 32 * cfg.patch_size, 24 * cfg.patch_size
    feats = vfm(torch.empty(2, 3, 3, H, W, device="meta"))
    assert feats.shape == (2, 3, 32 * 24, cfg.hidden_size)
    if size == "dinov3-vitb16":  # 85.66M: the paper's DINOv3 ViT-B/16 (86M)
        D = 768
        expected = _vit_params(D, 12, 3072, gated=False, qk=False, gate_heads=12)
        expected += 3 * 16 * 16 * D + D + D * (1 + 4 + 1) + 2 * D
        assert sum(p.numel() for p in vfm.parameters()) == expected == 85_660_416


@pytest.mark.parametrize("size", ["deltatok-b16", "tiny"])
def test_deltatok_shapes_on_meta(size):
    cfg = DELTATOK_SIZES[size]
    with torch.device("meta"):
        model = cfg.build().eval()
    B, T, N, D = 2, 4, 1024, cfg.hidden_size  # 512px frames through a /16 VFM
    x = torch.empty(B, N, D, device="meta")
    delta = model.encode(x, x)
    assert delta.shape == (B, D)
    assert model.decode(delta, x).shape == (B, N, D)
    y_hat, loss = model(x, x)
    assert y_hat.shape == (B, N, D) and loss.shape == () and loss.dtype == torch.float32
    clip = torch.empty(B, T, N, D, device="meta")
    deltas = model.tokenize_clip(clip)
    assert deltas.shape == (B, T - 1, D)
    assert model.rollout(x, deltas).shape == (B, T - 1, N, D)
    if size == "deltatok-b16":  # two ViT-B stacks (12 + 12 layers) + z, xy embeds, final norm
        expected = _vit_params(D, 24, 2048, gated=True, qk=True, gate_heads=12) + 5 * D
        assert sum(p.numel() for p in model.parameters()) == expected == 170_380_320


def test_input_validation():
    model = _tiny()
    x = _feats(2, 16, 64)
    with pytest.raises(ValueError, match="last dim 64"):
        model.encode(_feats(2, 16, 32), _feats(2, 16, 32))
    with pytest.raises(ValueError, match="differ"):
        model.encode(x, x[:, :9])
    with pytest.raises(ValueError, match="patch_coords"):
        model.encode(x[:, :12], x[:, :12])  # 12 tokens: not a square grid
    assert model.encode(x[:, :12], x[:, :12], coords_N2=patch_coords(3, 4)).shape == (2, 64)
    with pytest.raises(ValueError, match="T >= 2"):
        model.tokenize_clip(x[:, None])
    vfm = vfm_config("tiny").build()
    with pytest.raises(ValueError, match="multiple of patch_size=8"):
        vfm(torch.rand(1, 3, 20, 24))


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------


def test_log_cosh_exact_values():
    pred = torch.tensor([[0.0, 1.0, -2.0], [0.5, 30.0, -0.25]])
    target = torch.tensor([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.25]])
    by_hand = [math.log(math.cosh(d)) for d in (0.0, 1.0, 2.0, 1.0, 30.0, 0.5)]
    per = log_cosh_loss(pred, target, reduction="none")
    torch.testing.assert_close(per.flatten(), torch.tensor(by_hand), rtol=1e-6, atol=1e-7)
    assert abs(log_cosh_loss(pred, target).item() - sum(by_hand) / 6) < 1e-6
    assert abs(by_hand[4] - (30.0 - math.log(2.0))) < 1e-12  # asymptote |d| - log 2


def test_log_cosh_is_fp32_and_does_not_overflow():
    pred = torch.tensor([200.0, -1000.0], dtype=torch.bfloat16)
    loss = log_cosh_loss(pred, torch.zeros(2, dtype=torch.bfloat16), reduction="none")
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([200.0, 1000.0]) - math.log(2.0))
    target = torch.ones(3, requires_grad=True)
    log_cosh_loss(torch.zeros(3, requires_grad=True), target).backward()
    assert target.grad is None  # the target is detached, as in the official training step
    with pytest.raises(ValueError, match="reduction"):
        log_cosh_loss(pred, pred, reduction="sum")


# --------------------------------------------------------------------------------------------------
# RoPE shared by both frames
# --------------------------------------------------------------------------------------------------


def test_rope_is_shared_by_both_frames():
    """Token i of x and token i of y sit at the same rotary position. So once the frame embeddings
    are zeroed, swapping the frames, [z, x, y] -> [z, y, x], is a permutation of the sequence that
    keeps every token's position, and the encoder output cannot change. With a separate position
    range per frame (the control below: y's table shifted by one patch) it does change."""
    model = _tiny()
    with torch.no_grad():
        for blk in model.encoder_blocks:  # make the blocks matter at this tiny size
            blk.layer_scale1.lambda1.fill_(1.0)
            blk.layer_scale2.lambda1.fill_(1.0)
    x, y = _feats(2, 16, 64, seed=1), _feats(2, 16, 64, seed=2)
    with torch.no_grad():
        assert (model.encode(x, y) - model.encode(y, x)).abs().max() > 1e-3  # frame embeddings
        model.xy_embed.weight.zero_()
        torch.testing.assert_close(model.encode(x, y), model.encode(y, x), rtol=1e-5, atol=1e-5)

        cos, sin = model._rope(16, None, x.device)
        offset = (torch.cat((cos, cos.roll(1, 0))), torch.cat((sin, sin.roll(1, 0))))
        z = model.z_embed.weight[None].expand(2, -1, -1)
        xy = model._run(model.encoder_blocks, torch.cat((z, x, y), 1), offset)[:, 0]
        yx = model._run(model.encoder_blocks, torch.cat((z, y, x), 1), offset)[:, 0]
    assert (xy - yx).abs().max() > 1e-3


def test_positions_matter_and_move_with_tokens():
    model = _tiny()
    with torch.no_grad():
        for blk in [*model.encoder_blocks, *model.decoder_blocks]:
            blk.layer_scale1.lambda1.fill_(1.0)
            blk.layer_scale2.lambda1.fill_(1.0)
    x, y = _feats(2, 16, 64, seed=1), _feats(2, 16, 64, seed=2)
    coords = patch_coords(4, 4)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.encode(x, y, coords)
        swapped_ids = model.encode(x, y, coords[perm])  # same tokens, positions swapped
        moved = model.encode(x[:, perm], y[:, perm], coords[perm])  # tokens carry their position
        y_hat = model.decode(base, x, coords)
        y_hat_moved = model.decode(base, x[:, perm], coords[perm])
    assert (swapped_ids - base).abs().max() > 1e-3
    torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_hat_moved, y_hat[:, perm], rtol=1e-5, atol=1e-5)


def test_rope_rescale_only_in_training():
    model = _tiny()
    with torch.no_grad():
        for blk in model.encoder_blocks:
            blk.layer_scale1.lambda1.fill_(1.0)
    x, y = _feats(1, 16, 64, seed=1), _feats(1, 16, 64, seed=2)
    with torch.no_grad():
        ev = model.encode(x, y)
        torch.manual_seed(0)
        tr = model.train().encode(x, y)
        no_aug = _tiny(rope_rescale=None)
        no_aug.load_state_dict(model.state_dict())
        tr_off = no_aug.train().encode(x, y)
    assert (tr - ev).abs().max() > 1e-4
    torch.testing.assert_close(tr_off, ev)


# --------------------------------------------------------------------------------------------------
# encode / decode / clips
# --------------------------------------------------------------------------------------------------


def test_decoder_starts_near_identity_on_x():
    """Layer scale 1e-5: at init the decoder passes x through almost unchanged."""
    model = _tiny()
    x = _feats(2, 16, 64)
    with torch.no_grad():
        y_hat = model.decode(model.encode(x, _feats(2, 16, 64, seed=1)), x)
    assert (y_hat - x).abs().max() < 1e-3


def test_tokenize_clip_equals_pairwise_encode_and_rollout_chains():
    model = _tiny()
    with torch.no_grad():
        for blk in [*model.encoder_blocks, *model.decoder_blocks]:
            blk.layer_scale1.lambda1.fill_(0.5)
            blk.layer_scale2.lambda1.fill_(0.5)
    clip = _feats(3, 5, 16, 64)
    with torch.no_grad():
        deltas = model.tokenize_clip(clip)
        pairwise = torch.stack([model.encode(clip[:, t], clip[:, t + 1]) for t in range(4)], 1)
        torch.testing.assert_close(deltas, pairwise, rtol=1e-5, atol=1e-5)

        recon = model.rollout(clip[:, 0], deltas)
        x = clip[:, 0]
        for t in range(4):
            x = model.decode(deltas[:, t], x)  # x = previous reconstruction, not the true frame
            torch.testing.assert_close(recon[:, t], x, rtol=1e-5, atol=1e-5)
        teacher = model.decode(deltas[:, 2], clip[:, 2])
        assert (teacher - recon[:, 2]).abs().max() > 1e-3

        cl_deltas, cl_recon = model.tokenize_closed_loop(clip)
        torch.testing.assert_close(cl_deltas[:, 0], deltas[:, 0])
        torch.testing.assert_close(model.rollout(clip[:, 0], cl_deltas), cl_recon)


# --------------------------------------------------------------------------------------------------
# frozen VFM
# --------------------------------------------------------------------------------------------------


def test_frozen_vfm_gets_no_gradient():
    vfm = vfm_config("tiny").build()
    model = deltatok_config("tiny").build().train()
    assert not vfm.training and not any(p.requires_grad for p in vfm.parameters())
    parent = torch.nn.ModuleDict({"vfm": vfm, "tok": model}).train()  # a trainer's .train()
    assert not vfm.training and model.training
    images = torch.rand(2, 2, 3, 32, 32, requires_grad=True)
    feats = vfm(images)
    assert feats.shape == (2, 2, 16, 64) and not feats.requires_grad
    _, loss = parent["tok"](feats[:, 0], feats[:, 1])
    loss.backward()
    assert all(p.grad is None for p in vfm.parameters()) and images.grad is None
    assert model.z_embed.weight.grad is not None
    assert all(p.grad is not None for p in model.encoder_blocks.parameters())


def test_vfm_random_init_is_seeded_and_accepts_uint8():
    a, b = vfm_config("tiny").build(), vfm_config("tiny").build()
    c = vfm_config("tiny", init_seed=1).build()
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    img = torch.randint(0, 256, (1, 3, 16, 24), dtype=torch.uint8)
    torch.testing.assert_close(a(img), a(img.float() / 255))
    torch.manual_seed(123)
    d = vfm_config("tiny").build()
    assert weights_digest(d) == weights_digest(a)  # independent of the global RNG


# --------------------------------------------------------------------------------------------------
# DINOv3 checkpoint names
# --------------------------------------------------------------------------------------------------


def _official_dinov3_shapes(D: int, layers: int, mlp: int, registers: int, patch: int):
    """Meta's facebookresearch/dinov3 ViT state dict: names and shapes (GELU MLP, masked k-bias)."""
    shapes = {
        "cls_token": (1, 1, D),
        "storage_tokens": (1, registers, D),
        "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, patch, patch),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
            p + "attn.qkv.bias_mask": (3 * D,),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "ls1.gamma": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.fc1.weight": (mlp, D), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (D, mlp), p + "mlp.fc2.bias": (D,),
            p + "ls2.gamma": (D,),
        }
    return shapes


def test_dinov3_key_mapping_vitb16_official_names_and_shapes():
    cfg = VFM_SIZES["dinov3-vitb16"]
    shapes = _official_dinov3_shapes(768, 12, 3072, 4, 16)
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    official["rope_embed.periods"] = 100.0 ** (torch.arange(16) / 16)  # theta ** (4i / 64)
    with torch.device("meta"):
        ours = FrozenViT(cfg).state_dict()
    mapped = dinov3_to_vgen(official, cfg)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    back = vgen_to_dinov3(ours, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        **shapes, "rope_embed.periods": (16,)
    }


def test_dinov3_mapping_round_trip_and_load(tmp_path):
    cfg = vfm_config("tiny", init_seed=3)
    src = cfg.build()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    official = vgen_to_dinov3(state, cfg)
    assert official["blocks.1.attn.qkv.bias"][64:128].abs().max() == 0  # k third, masked
    assert official["blocks.1.attn.qkv.bias_mask"].tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64
    back = dinov3_to_vgen(official, cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    images = torch.rand(2, 3, 32, 40)
    save_file(official, str(tmp_path / "meta.safetensors"))
    loaded = load_vfm(tmp_path / "meta.safetensors", vfm_config("tiny"))  # seed 0: init replaced
    assert weights_digest(loaded) == weights_digest(src)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(images), src(images), rtol=0, atol=0)

    save_file({"model." + k: v for k, v in state.items()}, str(tmp_path / "hf.safetensors"))
    loaded = load_vfm(tmp_path / "hf.safetensors", vfm_config("tiny"), prefix="model.")
    torch.testing.assert_close(loaded(images), src(images), rtol=0, atol=0)


def test_load_vfm_errors_name_the_key(tmp_path):
    cfg = vfm_config("tiny")
    state = dict(cfg.build().state_dict())
    bad = dict(state, **{"layer.1.mlp.up_proj.weight": torch.zeros(256, 64)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"'layer\.1\.mlp\.up_proj\.weight' has shape "
                                         r"\(256, 64\) in the file but \(128, 64\)"):
        load_vfm(tmp_path / "shape.safetensors", cfg)
    save_file({k: v for k, v in state.items() if k != "norm.bias"}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="'norm.bias' is missing"):
        load_vfm(tmp_path / "m.safetensors", cfg)
    save_file(dict(state, extra=torch.zeros(1)), str(tmp_path / "u.safetensors"))
    with pytest.raises(ValueError, match="unexpected weight 'extra'"):
        load_vfm(tmp_path / "u.safetensors", cfg)
    official = vgen_to_dinov3(state, cfg)
    official["rope_embed.periods"] = official["rope_embed.periods"] * 2
    save_file(official, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match="rope_theta"):
        load_vfm(tmp_path / "p.safetensors", cfg)
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never pickle"):
        load_vfm(tmp_path / "w.pth", cfg)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def test_families_registered_at_import():
    assert tok_io._resolve("deltatok") is DeltaTok
    assert tok_io._resolve("vfm_vit") is FrozenViT


def test_save_load_round_trip(tmp_path):
    model = _tiny(num_layers=1)
    out = save_pretrained(model, tmp_path / "tok")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "deltatok" and cfg["num_layers"] == 1
    loaded = load_pretrained(out, expected_family="deltatok")
    assert loaded.config == model.config and weights_digest(loaded) == weights_digest(model)
    x, y = _feats(2, 16, 64), _feats(2, 16, 64, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x, y)[0], model(x, y)[0])

    vfm = vfm_config("tiny", init_seed=5).build()
    loaded_vfm = load_pretrained(save_pretrained(vfm, tmp_path / "vfm"), expected_family="vfm_vit")
    assert isinstance(loaded_vfm, FrozenViT) and loaded_vfm.config.init_seed == 5
    assert not any(p.requires_grad for p in loaded_vfm.parameters())
    img = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded_vfm(img), vfm(img))


def test_load_deltatok_from_official_checkpoint_layout(tmp_path):
    model = _tiny(num_layers=1)
    state = {"network." + k: v for k, v in model.state_dict().items()}
    state["network.backbone.backbone.norm.weight"] = torch.ones(64)  # frozen VFM: dropped
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    loaded = load_deltatok(tmp_path / "ckpt.safetensors", model.config)
    assert weights_digest(loaded) == weights_digest(model)


# --------------------------------------------------------------------------------------------------
# tiny training on real frames
# --------------------------------------------------------------------------------------------------


def _shifted_crop_pairs(n: int, size: int, max_shift: int, seed: int) -> torch.Tensor:
    """(n, 2, 3, size, size) uint8: a crop of skimage's astronaut photo and the same crop moved by
    up to max_shift pixels in each direction (a camera pan between two frames)."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)  # (3, 512, 512)
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        r, c = rng.integers(max_shift, img.shape[1] - size - max_shift, size=2)
        dr, dc = rng.integers(-max_shift, max_shift + 1, size=2)
        frames.append(torch.stack((img[:, r:r + size, c:c + size],
                                   img[:, r + dr:r + dr + size, c + dc:c + dc + size])))
    return torch.stack(frames)


def test_tiny_training_reduces_reconstruction_loss(one_thread):
    """Golden curve: tiny frozen VFM (random init) on 48px crops of a photograph -> 6x6 tokens per
    frame; 128 frame pairs shifted by <= 4 px; tiny DeltaTok (paper init, layer scale 1e-5),
    AdamW lr 3e-3, batch 16, 120 steps (~10 s). Measured (seed 0, 1 thread): log-cosh on the
    training pairs 0.1103 at init (= copying x: the decoder starts as identity) -> 0.0788; decoding
    each pair with another pair's delta gives 0.0816, so at this budget most of the gain is the
    decoder's and a little is in the token. The bound 0.089 sits a third of the way back to the
    start."""
    vfm = vfm_config("tiny").build()
    feats = vfm(_shifted_crop_pairs(128, 48, 4, seed=0))  # (128, 2, 36, 64)
    x, y = feats[:, 0], feats[:, 1]
    torch.manual_seed(0)
    model = deltatok_config("tiny").build()
    with torch.no_grad():
        start = log_cosh_loss(model.eval().decode(model.encode(x, y), x), y).item()
    opt = torch.optim.AdamW(model.train().parameters(), lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(feats), (16,), generator=gen)
        _, loss = model(x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        delta = model.eval().encode(x, y)
        final = log_cosh_loss(model.decode(delta, x), y).item()
        shuffled = log_cosh_loss(model.decode(delta.roll(1, 0), x), y).item()
    assert abs(start - log_cosh_loss(x, y).item()) < 1e-3
    assert final < 0.089, (start, final)
    assert shuffled > final, (final, shuffled)  # the token already carries pair-specific content


def test_weights_convert_reads_the_lightning_layout(tmp_path, capsys):
    """`vgen weights convert --family deltatok` maps the official prefixes (through the family's
    key map, as the tokenize stage's `weights:` does) and reports the dropped backbone."""
    import json

    from pipelines.cli import main

    model = _tiny(num_layers=1)
    state = {"network._orig_mod." + k: v for k, v in model.state_dict().items()}
    state["network.backbone.backbone.norm.weight"] = torch.ones(64)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    args = ["weights", "convert", "--family", "deltatok", "--size", "tiny", "--set",
            "num_layers=1", "--json"]
    assert main([*args, str(tmp_path / "last.ckpt"), str(tmp_path / "out")]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["names"] == "released"
    assert list(manifest["dropped"]) == ["network.backbone.backbone.norm.weight"]
    from vgen_core.tokenizers.io import load_pretrained

    assert weights_digest(load_pretrained(tmp_path / "out")) == weights_digest(model)
