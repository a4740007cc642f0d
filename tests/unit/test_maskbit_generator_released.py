"""Released MaskBit generators: names and shapes of every release, strict loading, the official
forward.

The reference below restates markweberdev/maskbit @5ea3d73 `modeling/bert.py` (LFQBert with
post-norm BertAttention on `nn.MultiheadAttention`, BertFeedForward, `preprocess_tokens` through the
`bits_to_indices` buffer); its state dict, with `input_proj` named `token_emb` as in the released
files (demo_utils.get_generator renames it on load), is a release.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vgen_core import families
from vgen_core.generators.maskbit import (
    MASKBIT_RELEASES,
    MASKBIT_SAMPLING,
    MASKBIT_SIZES,
    OFFICIAL_DROPPED,
    MaskBit,
    MaskBitConfig,
    load_official,
    maskbit_config,
    official_key_map,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# The official module, restated (modeling/bert.py LFQBert, use_prenorm=False, dropout off)
# --------------------------------------------------------------------------------------------------


class _BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, num_heads=heads, dropout=0.0, batch_first=True,
                                         bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        value, _ = self.mha(x, x, x, need_weights=False)
        return self.norm(value + x)


class _BertFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.net(x) + x)


class _TransformerEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_BertAttention(dim, heads), _BertFeedForward(dim, mlp)])
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for attn, ffn in self.layers:
            x = ffn(attn(x))
        return x


class OfficialLFQBert(nn.Module):
    def __init__(self, hidden: int, depth: int, heads: int, mlp: int, codebook_size: int,
                 splits: int, nclass: int, seq_len: int) -> None:
        super().__init__()
        self.drop_label, self.seq_len, self.splits = nclass, seq_len, splits
        self.bits = int(math.log2(codebook_size))
        effective_bits = self.bits // splits
        self.effective_codebook_size = int(2**effective_bits)
        self.mask_token = self.effective_codebook_size
        self.register_buffer("bits_to_indices",
                             torch.pow(2.0, torch.arange(0, effective_bits)).int())
        self.class_emb = nn.Embedding(nclass + 1, hidden)
        self.input_proj = nn.Linear(self.bits, hidden)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len + 1, hidden))
        self.first_layer = nn.Sequential(nn.LayerNorm(hidden, eps=1e-12), nn.Dropout(0.0))
        self.transformer = _TransformerEncoder(hidden, depth, heads, mlp)
        self.last_layer = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                        nn.LayerNorm(hidden, eps=1e-12))
        self.prediction_layer = nn.Linear(hidden, splits * self.effective_codebook_size)

    def preprocess_tokens(self, img_tokens: Tensor) -> Tensor:
        mask = img_tokens == self.mask_token
        bits = ((img_tokens[..., None].int() & self.bits_to_indices) != 0).float() * 2.0 - 1.0
        bits[mask, :] = 0.0
        return bits.flatten(-2)  # "b n m c -> b n (m c)"

    def forward(self, img_tokens: Tensor, class_labels: Tensor, drop_label_mask: Tensor) -> Tensor:
        b = img_tokens.size(0)
        x_bits = self.preprocess_tokens(img_tokens)
        cls_token = class_labels.clone().view(b, -1)
        cls_token[drop_label_mask] = self.drop_label
        cls_embedding = self.class_emb(cls_token.view(b, -1))
        x = torch.cat([self.input_proj(x_bits), cls_embedding], dim=1) + self.pos_emb
        x = self.last_layer(self.transformer(self.first_layer(x)))
        logits = self.prediction_layer(x).unflatten(-1, (self.splits, -1))  # b n (m c)
        return logits[:, : self.seq_len]


def _as_released(official: nn.Module) -> dict[str, Tensor]:
    """The official state dict with the released name of the input projection."""
    return {k.replace("input_proj.", "token_emb.", 1): v.clone()
            for k, v in official.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Released names and shapes, written from modeling/bert.py + configs/generator/*.yaml
# --------------------------------------------------------------------------------------------------

#: the released generators: maskbit_generator_{K}bit, all 1024 x 24, 16 heads, MLP 4096, 2 splits
RELEASE_BITS = {"L-k10": 10, "L": 12, "L-k14": 14, "L-k16": 16, "L-k18": 18}


def released_shapes(K: int, G: int = 2, D: int = 1024, depth: int = 24, M: int = 4096,
                    L: int = 256, C: int = 1000) -> dict[str, tuple[int, ...]]:
    e = K // G
    s: dict[str, tuple[int, ...]] = {
        "bits_to_indices": (e,), "class_emb.weight": (C + 1, D),
        "token_emb.weight": (D, K), "token_emb.bias": (D,), "pos_emb": (1, L + 1, D),
        "first_layer.0.weight": (D,), "first_layer.0.bias": (D,),
    }
    for i in range(depth):
        p = f"transformer.layers.{i}."
        s.update({
            p + "0.mha.in_proj_weight": (3 * D, D), p + "0.mha.in_proj_bias": (3 * D,),
            p + "0.mha.out_proj.weight": (D, D), p + "0.mha.out_proj.bias": (D,),
            p + "0.norm.weight": (D,), p + "0.norm.bias": (D,),
            p + "1.net.0.weight": (M, D), p + "1.net.0.bias": (M,),
            p + "1.net.2.weight": (D, M), p + "1.net.2.bias": (D,),
            p + "1.norm.weight": (D,), p + "1.norm.bias": (D,),
        })
    s.update({"last_layer.0.weight": (D, D), "last_layer.0.bias": (D,),
              "last_layer.2.weight": (D,), "last_layer.2.bias": (D,),
              "prediction_layer.weight": (G * 2**e, D), "prediction_layer.bias": (G * 2**e,)})
    return s


def _meta_release(K: int) -> dict[str, Tensor]:
    """Released names and shapes on meta, with the real fixed buffer."""
    out = {k: torch.empty(s, device="meta") for k, s in released_shapes(K).items()}
    out["bits_to_indices"] = torch.pow(2.0, torch.arange(K // 2)).int()
    return out


TINY = maskbit_config("tiny")  # K 8, G 2, L 64, C 10, D 64, depth 2, 4 heads, MLP 256
#: odd shapes: 3 groups of 3 bits, 3 heads of 16, one layer, 16 positions, 5 classes
ODD = MaskBitConfig(token_bits=9, codebook_splits=3, seq_len=16, num_classes=5, hidden=48,
                    depth=1, heads=3, mlp_dim=80, dropout=0.0)


def _official(cfg: MaskBitConfig, seed: int = 0) -> OfficialLFQBert:
    torch.manual_seed(seed)
    ref = OfficialLFQBert(cfg.hidden, cfg.depth, cfg.heads, cfg.mlp_dim, 1 << cfg.token_bits,
                          cfg.codebook_splits, cfg.num_classes, cfg.seq_len)
    with torch.no_grad():  # random everything (norms included), so every tensor matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref.eval()


@pytest.fixture(scope="module")
def official() -> OfficialLFQBert:
    return _official(TINY)


@pytest.fixture(scope="module")
def released(official) -> dict[str, Tensor]:
    return _as_released(official)


# --------------------------------------------------------------------------------------------------
# (a) names and shapes convert strictly
# --------------------------------------------------------------------------------------------------


def test_restated_official_module_has_the_released_names_and_shapes(released):
    want = released_shapes(TINY.token_bits, TINY.codebook_splits, TINY.hidden, TINY.depth,
                           TINY.mlp_dim, TINY.seq_len, TINY.num_classes)
    assert {k: tuple(v.shape) for k, v in released.items()} == want
    assert released["bits_to_indices"].dtype == torch.int32


@pytest.mark.parametrize("size", list(RELEASE_BITS))
def test_every_release_converts_strictly_on_meta(size):
    K = RELEASE_BITS[size]
    cfg = MASKBIT_SIZES[size]
    assert (cfg.token_bits, cfg.codebook_splits, cfg.hidden, cfg.depth, cfg.heads, cfg.mlp_dim,
            cfg.seq_len, cfg.num_classes, cfg.layer_norm_eps) == \
        (K, 2, 1024, 24, 16, 4096, 256, 1000, 1e-12)
    state = _meta_release(K)
    total_m = sum(t.numel() for k, t in state.items() if k != "bits_to_indices") / 1e6
    assert total_m == pytest.approx(305, rel=0.01)  # paper: ~305M
    mapped = official_key_map(state)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MaskBit(cfg).state_dict().items()}
        model = load_official(state, MASKBIT_RELEASES[size])  # the release name resolves
        assert isinstance(model, MaskBit) and not model.training
        logits = model(torch.zeros(2, 256, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert tuple(logits.shape) == (2, 256, 2, 1 << (K // 2))


def test_names_map_by_rename_and_the_fixed_buffer_is_dropped(released):
    mapped = official_key_map(released)
    assert "bits_to_indices" in OFFICIAL_DROPPED and len(mapped) == len(released) - 1
    assert mapped["input_proj.weight"] is released["token_emb.weight"]
    assert mapped["blocks.1.qkv.weight"] is released["transformer.layers.1.0.mha.in_proj_weight"]
    assert mapped["head.bias"] is released["prediction_layer.bias"]
    # the name the current official code uses (after its rename) loads the same
    renamed = {k.replace("token_emb.", "input_proj."): v for k, v in released.items()}
    assert official_key_map(renamed).keys() == mapped.keys()


def test_load_official_from_safetensors_and_spec(tmp_path, released):
    path = tmp_path / "maskbit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    spec = families.get("maskbit")
    assert spec.load_official is load_official
    model = spec.load_official(path, "tiny")
    assert not model.training
    assert torch.equal(model.state_dict()["emb_norm.weight"], released["first_layer.0.weight"])
    with pytest.raises(ValueError, match="pickle"):
        load_official(tmp_path / "maskbit_generator_12bit.bin", "L")


def test_weights_inspect_matches_a_release_through_the_key_map(tmp_path, released, capsys):
    from pipelines.cli import main

    path = tmp_path / "maskbit_release.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["match"]
    assert (m["family"], m["size"], m["key_map"]) == ("maskbit", "tiny", True)
    assert m["missing"] == m["unexpected"] == m["mismatched"] == []


# --------------------------------------------------------------------------------------------------
# (b) numerics: vgen's logits equal the official forward's on the same weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["K8-G2-D64", "K9-G3-D48-H3"])
def test_logits_equal_the_official_forward(cfg):
    official = _official(cfg, seed=3)
    model = load_official(_as_released(official), cfg)
    g = torch.Generator().manual_seed(4)
    B, L, G, C = 3, cfg.seq_len, cfg.codebook_splits, cfg.group_size
    groups = torch.randint(0, C, (B, L, G), generator=g)
    masked = torch.rand(B, L, G, generator=g) < 0.4
    groups = torch.where(masked, C, groups)  # the mask id of each group
    labels = torch.tensor([1, 4, 2])
    drop = torch.tensor([False, False, True])  # the last one is the null class
    with torch.no_grad():
        ref = official(groups, labels, drop)
        ours = model(groups, torch.where(drop, model.null_class_id, labels))
    assert ref.shape == ours.shape == (B, L, G, C)
    torch.testing.assert_close(ours, ref)


def test_spec_sampling_is_the_released_eval_settings():
    # configs/generator/maskbit_generator_*.yaml mlm_model: num_steps, guidance_scale, scale_pow,
    # randomize_temperature, softmax_temperature (guidance_annealing "cosine", arccos schedule)
    yaml = {"10bit": (64, 6.4, 2.5, 10.5), "12bit": (64, 7.1, 3.0, 8.2),
            "14bit": (64, 7.1, 3.0, 7.8), "14bit_128steps": (128, 7.1, 3.0, 9.0),
            "14bit_256steps": (256, 5.8, 3.0, 10.3), "16bit": (64, 6.5, 2.5, 7.5),
            "18bit": (64, 5.7, 2.5, 8.5)}
    assert set(MASKBIT_SAMPLING) == {f"maskbit_generator_{k}" for k in yaml}
    for name, (steps, g, p, t) in yaml.items():
        assert MASKBIT_SAMPLING[f"maskbit_generator_{name}"] == {
            "steps": steps, "guidance_scale": g, "scale_pow": p, "randomize_temperature": t,
            "softmax_temperature": 1.0}
    spec = families.get("maskbit")
    assert set(spec.sampling) == set(RELEASE_BITS)
    for size, K in RELEASE_BITS.items():
        assert spec.sampling[size] == MASKBIT_SAMPLING[f"maskbit_generator_{K}bit"]
        inspect.signature(sample).bind(None, None, **spec.sampling[size])


# --------------------------------------------------------------------------------------------------
# (c) bad input names the key
# --------------------------------------------------------------------------------------------------


def test_another_familys_release_is_refused_naming_its_key():
    rar = {"cls_token": torch.zeros(1, 1, 64), "embeddings.weight": torch.zeros(268, 64),
           "pos_embed": torch.zeros(1, 1088, 64)}
    with pytest.raises(ValueError, match="'cls_token' is not a key of a released MaskBit"):
        load_official(rar, "tiny")


def test_a_vgen_export_and_other_variants_are_not_releases(released):
    vgen_state = load_official(released, "tiny").state_dict()
    with pytest.raises(ValueError, match="'emb_norm.weight' is not a key"):
        official_key_map(vgen_state)
    with pytest.raises(ValueError, match="'norm_after_transformer.weight'.*use_prenorm=True"):
        official_key_map(dict(released, **{"norm_after_transformer.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match="'tok_emb_list.0.weight'.*index-token `Bert`"):
        official_key_map(dict(released, **{"tok_emb_list.0.weight": torch.ones(17, 64)}))
    both = dict(released, **{"input_proj.weight": released["token_emb.weight"]})
    with pytest.raises(ValueError, match="both 'token_emb.\\*' and 'input_proj.\\*'"):
        official_key_map(both)


@pytest.mark.parametrize("key", ["transformer.layers.1.1.net.2.bias", "token_emb.bias",
                                 "first_layer.0.weight", "bits_to_indices"])
def test_a_missing_key_is_named(released, key):
    state = {k: v for k, v in released.items() if k != key}
    with pytest.raises(ValueError, match=f"no '{key}'"):
        load_official(state, "tiny")


def test_a_wrong_shape_or_buffer_is_named(released):
    state = dict(released, **{"transformer.layers.0.0.mha.out_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"'transformer.layers.0.0.mha.out_proj.weight' \(vgen "
                                         r"'blocks.0.proj.weight'\) has shape \(64, 32\).*"
                                         r"expects \(64, 64\)"):
        load_official(state, "tiny")
    with pytest.raises(ValueError, match=r"'bits_to_indices' holds \[1, 2, 4, 9\]"):
        load_official(dict(released, bits_to_indices=torch.tensor([1, 2, 4, 9])), "tiny")
    # a K = 12 (G = 2) release into the K = 8 tiny config: named by the buffer
    with pytest.raises(ValueError, match=r"'bits_to_indices' has shape \(6,\).*expects \(4,\)"):
        load_official(_meta_release(12), "tiny")
    # inconsistent K / e / head rows
    bad = dict(released, **{"prediction_layer.weight": torch.zeros(40, 64)})
    with pytest.raises(ValueError, match="'bits_to_indices' has 4 entries.*40 rows"):
        load_official(bad, "tiny")
    # a depth-3 checkpoint into depth 2
    extra = dict(released, **{"transformer.layers.2.0.norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="'transformer.layers.2.0.norm.weight' has no place"):
        load_official(extra, "tiny")
