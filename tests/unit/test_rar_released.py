"""Released RAR weights: names and shapes of every release, strict loading, the official forward.

The reference below restates bytedance/1d-tokenizer @942a96f `modeling/rar.py` (Attention with QK
LayerNorm and KV cache, Block with 6-way adaLN, FinalLayer, RAR.forward_fn and RAR.generate) with
the released table lengths (L + 1024 / L + 100 rows) and names, so its state dict is a release.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from vgen_core import families
from vgen_core.generators.rar import (
    OFFICIAL_DROPPED,
    RAR,
    RAR_SAMPLING,
    RAR_SIZES,
    load_official,
    official_key_map,
    rar_config,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# The official module, restated (modeling/rar.py; timm Mlp = fc1 -> GELU -> fc2, dropout off)
# --------------------------------------------------------------------------------------------------


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.kv_cache = False
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_cache:
            if self.k_cache is not None and self.v_cache is not None:
                k = torch.cat([self.k_cache, k], dim=-2)
                v = torch.cat([self.v_cache, v], dim=-2)
            self.k_cache, self.v_cache = k, v
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: Tensor, attn_mask: Tensor | None, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(_modulate(self.norm1(x), sh1, sc1), attn_mask=attn_mask)
        return x + g2 * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class _FinalLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)


class OfficialRAR(nn.Module):
    def __init__(self, D: int, depth: int, heads: int, mlp: int, L: int, V: int, C: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(_Block(D, heads, mlp) for _ in range(depth))
        self.embeddings = nn.Embedding(V + 1 + C + 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1024, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, L + 1024, D))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, L + 100, D))
        self.adaln_before_head = _FinalLayer(D)
        self.lm_head = nn.Linear(D, V, bias=True)
        self.image_seq_len, self.target_codebook_size = L, V
        self.none_condition_id = C + V + 1
        mask = torch.full((L + 1024, L + 1024), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def set_kv_cache(self, on: bool) -> None:
        for blk in self.blocks:
            blk.attn.kv_cache, blk.attn.k_cache, blk.attn.v_cache = on, None, None

    @staticmethod
    def shuffle(x: Tensor, orders: Tensor) -> Tensor:
        batch_indices = torch.arange(x.shape[0]).unsqueeze(1).expand(-1, x.shape[1])
        return x[batch_indices, orders]

    def forward_fn(self, input_ids: Tensor, condition: Tensor, orders: Tensor | None = None,
                   is_sampling: bool = False) -> Tensor:
        if orders is None:
            orders = torch.arange(self.image_seq_len).expand(input_ids.shape[0], -1)
        input_ids = torch.cat([condition.view(condition.shape[0], -1),
                               input_ids.view(input_ids.shape[0], -1)], dim=1)
        embeddings = self.embeddings(input_ids)
        condition_token = embeddings[:, 0]
        pos_embed = self.pos_embed.repeat(input_ids.shape[0], 1, 1)
        prefix = 2
        pos_embed_prefix = pos_embed[:, :prefix]
        pos_embed_postfix = self.shuffle(pos_embed[:, prefix:prefix + self.image_seq_len], orders)
        tape = self.target_aware_pos_embed.repeat(input_ids.shape[0], 1, 1)
        tape_postfix = self.shuffle(tape[:, prefix:prefix + self.image_seq_len], orders)
        if not is_sampling:
            embeddings = torch.cat([embeddings[:, :1], self.shuffle(embeddings[:, 1:], orders)], 1)
        x = torch.cat((self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
        x = x + torch.cat([pos_embed_prefix, pos_embed_postfix], dim=1)[:, :x.shape[1]]
        tape = torch.cat([torch.zeros_like(x[:, :prefix - 1]), tape_postfix,
                          torch.zeros_like(x[:, -1:])], dim=1)
        x = x + tape[:, :x.shape[1]]
        attn_mask: Tensor | None = self.attn_mask[:x.shape[1], :x.shape[1]]
        condition_token = condition_token.unsqueeze(1) + self.timesteps_embeddings[:, :x.shape[1]]
        attn = self.blocks[0].attn
        if attn.kv_cache and attn.k_cache is not None and attn.v_cache is not None:
            x, attn_mask, condition_token = x[:, -1:], None, condition_token[:, -1:]
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, c=condition_token)
        if not attn.kv_cache:
            x, condition_token = x[:, prefix - 1:], condition_token[:, prefix - 1:]
        return self.lm_head(self.adaln_before_head(x, condition_token))

    @torch.no_grad()
    def generate(self, condition: Tensor, guidance_scale: float, randomize_temperature: float,
                 guidance_scale_pow: float) -> Tensor:
        """RAR.generate with kv_cache=True (preprocess_condition's drop draw, a no-op at
        cond_drop_prob 0, is left out)."""
        condition = condition + self.target_codebook_size + 1
        n = condition.shape[0]
        ids = torch.full((n, 0), -1)
        self.set_kv_cache(True)
        for step in range(self.image_seq_len):
            scale_pow = torch.ones(1) * guidance_scale_pow
            scale_step = (1 - torch.cos(((step / self.image_seq_len) ** scale_pow) * torch.pi)) / 2
            cfg_scale = (guidance_scale - 1) * scale_step + 1
            logits = self.forward_fn(torch.cat([ids, ids]), torch.cat(
                [condition, torch.full_like(condition, self.none_condition_id)]), is_sampling=True)
            cond_logits, uncond_logits = logits[:n], logits[n:]
            logits = (uncond_logits + (cond_logits - uncond_logits) * cfg_scale)[:, -1]
            probs = F.softmax(logits / randomize_temperature, dim=-1)
            ids = torch.cat((ids, torch.multinomial(probs, num_samples=1)), dim=-1)
        self.set_kv_cache(False)
        return ids


# --------------------------------------------------------------------------------------------------
# Released names and shapes, written from modeling/rar.py
# --------------------------------------------------------------------------------------------------

#: README_RAR.md: hidden_size / num_hidden_layers / intermediate_size, 16 heads; rar.yaml:
#: codebook 1024, image_seq_len 256, 1000 classes
RELEASES = {"rar_b": (768, 24, 3072), "rar_l": (1024, 24, 4096), "rar_xl": (1280, 32, 5120),
            "rar_xxl": (1408, 40, 6144)}
RELEASE_SIZE = {"rar_b": "B", "rar_l": "L", "rar_xl": "XL", "rar_xxl": "XXL"}
RELEASE_PARAMS_M = {"rar_b": 261, "rar_l": 461, "rar_xl": 955, "rar_xxl": 1500}  # paper (methods.md 2.3), M


def released_shapes(D: int, depth: int, M: int, H: int = 16, L: int = 256, V: int = 1024,
                    C: int = 1000) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D), "embeddings.weight": (V + 1 + C + 1, D),
        "pos_embed": (1, L + 1024, D), "target_aware_pos_embed": (1, L + 1024, D),
        "timesteps_embeddings": (1, L + 100, D),
        "adaln_before_head.adaLN_modulation.1.weight": (2 * D, D),
        "adaln_before_head.adaLN_modulation.1.bias": (2 * D,),
        "lm_head.weight": (V, D), "lm_head.bias": (V,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        for name, w, bias in (("norm1", None, (D,)), ("norm2", None, (D,)),
                              ("attn.qkv", (3 * D, D), (3 * D,)), ("attn.proj", (D, D), (D,)),
                              ("attn.q_norm", None, (D // H,)), ("attn.k_norm", None, (D // H,)),
                              ("mlp.fc1", (M, D), (M,)), ("mlp.fc2", (D, M), (D,)),
                              ("adaLN_modulation.1", (6 * D, D), (6 * D,))):
            s[f"{b}{name}.weight"] = w or bias
            s[f"{b}{name}.bias"] = bias
    return s


TINY = rar_config("tiny")  # V 256, L 64, C 10, D 64, depth 2, 4 heads, MLP 256


def _official_tiny(seed: int = 0) -> OfficialRAR:
    torch.manual_seed(seed)
    ref = OfficialRAR(TINY.hidden, TINY.depth, TINY.heads, TINY.mlp_dim, TINY.seq_len,
                      TINY.codebook_size, TINY.num_classes)
    with torch.no_grad():  # random everything (adaLN not zero), so every tensor matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref.eval()


@pytest.fixture(scope="module")
def official() -> OfficialRAR:
    return _official_tiny()


@pytest.fixture(scope="module")
def released(official) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in official.state_dict().items()}


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------------
# (a) names and shapes convert strictly
# --------------------------------------------------------------------------------------------------


def test_restated_official_module_has_the_released_names_and_shapes(official):
    want = released_shapes(TINY.hidden, TINY.depth, TINY.mlp_dim, TINY.heads, TINY.seq_len,
                           TINY.codebook_size, TINY.num_classes)
    assert {k: tuple(v.shape) for k, v in official.state_dict().items()} == want


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_release_converts_strictly_on_meta(release):
    D, depth, M = RELEASES[release]
    shapes = released_shapes(D, depth, M)
    total_m = sum(torch.Size(s).numel() for s in shapes.values()) / 1e6
    assert total_m == pytest.approx(RELEASE_PARAMS_M[release], rel=0.005)  # 261M .. 1.5B
    size = RELEASE_SIZE[release]
    cfg = RAR_SIZES[size]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.mlp_dim) == (D, depth, 16, M)
    assert (cfg.codebook_size, cfg.seq_len, cfg.num_classes, cfg.layer_norm_eps) == \
        (1024, 256, 1000, 1e-6)
    state = _meta_state(shapes)
    mapped = official_key_map(state)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in RAR(cfg).state_dict().items()}
        model = load_official(state, release)  # the release name resolves to the size
        assert isinstance(model, RAR) and not model.training
        logits = model(torch.zeros(2, 256, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert tuple(logits.shape) == (2, 256, 1024)


def test_tables_are_sliced_to_the_rows_the_official_forward_reads(released):
    mapped = official_key_map(released)
    L = TINY.seq_len
    assert torch.equal(mapped["pos_embed"], released["pos_embed"][:, : L + 2])
    assert torch.equal(mapped["target_aware_pos_embed"],
                       released["target_aware_pos_embed"][:, 2 : L + 2])
    assert torch.equal(mapped["timesteps_embeddings"], released["timesteps_embeddings"][:, : L + 2])
    assert set(mapped) == set(released)
    assert all(mapped[k] is released[k] for k in released
               if k not in ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings"))
    dropped = " ".join(OFFICIAL_DROPPED)
    for table in ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings"):
        assert table in dropped


def test_load_official_from_safetensors_and_spec(tmp_path, released):
    path = tmp_path / "rar_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    spec = families.get("rar")
    assert spec.load_official is load_official
    model = spec.load_official(path, TINY)
    assert not model.training
    assert torch.equal(model.state_dict()["lm_head.weight"], released["lm_head.weight"])
    # a .bin pickle is refused (never unpickled)
    with pytest.raises(ValueError, match="pickle"):
        load_official(tmp_path / "rar_b.bin", "B")


def test_weights_inspect_matches_a_release_through_the_key_map(tmp_path, released, capsys):
    import json

    from pipelines.cli import main

    path = tmp_path / "rar_release.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["match"]
    assert (m["family"], m["size"], m["key_map"]) == ("rar", "tiny", True)
    assert m["missing"] == m["unexpected"] == m["mismatched"] == []


def test_weights_convert_of_a_released_bin_reports_the_dropped_rows(tmp_path, released, capsys):
    import json

    from pipelines.cli import main
    from vgen_core.tokenizers.io import load_pretrained

    path = tmp_path / "rar_tiny.bin"
    torch.save(released, path)  # the releases are .bin pickles (read weights-only)
    assert main(["weights", "convert", "--family", "rar", "--size", "tiny", "--json", str(path),
                 str(tmp_path / "rar")]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["names"] == "released" and manifest["pixel_range"] is None
    assert sorted(manifest["dropped"]) == sorted(OFFICIAL_DROPPED)
    model = load_pretrained(tmp_path / "rar")
    assert torch.equal(model.state_dict()["pos_embed"], released["pos_embed"][:, :TINY.seq_len + 2])


# --------------------------------------------------------------------------------------------------
# (b) numerics: vgen's logits equal the official forward's on the same weights
# --------------------------------------------------------------------------------------------------


def test_teacher_forced_logits_equal_the_official_forward(official, released):
    model = load_official(released, TINY)
    g = torch.Generator().manual_seed(1)
    B, L, V, C = 3, TINY.seq_len, TINY.codebook_size, TINY.num_classes
    tokens = torch.randint(0, V, (B, L), generator=g)
    labels = torch.tensor([3, 7, C])  # the last one is the null class
    orders = torch.stack([torch.randperm(L, generator=g), torch.arange(L),
                          torch.randperm(L, generator=g)])
    condition = torch.where(labels == C, official.none_condition_id, labels + V + 1)
    with torch.no_grad():
        ref = official.forward_fn(tokens, condition, orders=orders)  # (B, L + 1, V), gen. order
        ours = model(tokens, labels, orders)  # (B, L, V), position order
    assert ref.shape == (B, L + 1, V)
    torch.testing.assert_close(ours.gather(1, orders[..., None].expand(-1, -1, V)), ref[:, :L])


def test_kv_cached_next_token_logits_equal_the_official_sampling_forward(official, released):
    model = load_official(released, TINY)
    g = torch.Generator().manual_seed(2)
    B, V = 2, TINY.codebook_size
    ids = torch.randint(0, V, (B, 6), generator=g)
    labels = torch.tensor([1, 4])
    cache = model.new_kv_cache()
    official.set_kv_cache(True)
    try:
        with torch.no_grad():
            for n in range(ids.shape[1]):
                ref = official.forward_fn(ids[:, :n], labels + V + 1, is_sampling=True)[:, -1]
                ours = model.next_token_logits(ids[:, :n], labels, cache)
                torch.testing.assert_close(ours, ref)
    finally:
        official.set_kv_cache(False)


def test_released_sampling_settings_reproduce_official_generate(official, released):
    """`sample(**RAR_SAMPLING[size])` = official generate(guidance_scale, randomize_temperature,
    guidance_scale_pow) token for token under one global seed (both draw one multinomial per
    step from the same probabilities)."""
    model = load_official(released, TINY)
    labels = torch.tensor([2, 9])
    for size in ("B", "XXL"):
        kw = RAR_SAMPLING[size]
        torch.manual_seed(5)
        ref = official.generate(labels, guidance_scale=kw["guidance_scale"],
                                randomize_temperature=kw["temperature"],
                                guidance_scale_pow=kw["guidance_power"])
        torch.manual_seed(5)
        ours = sample(model, labels, **kw)
        assert torch.equal(ours, ref)


def test_spec_sampling_is_the_readme_eval_settings():
    # README_RAR.md "Testing on ImageNet-1K Benchmark": randomize_temperature / guidance_scale /
    # guidance_scale_pow per size
    readme = {"B": (1.0, 16.0, 2.75), "L": (1.02, 15.5, 2.5), "XL": (1.02, 6.9, 1.5),
              "XXL": (1.02, 8.0, 1.2)}
    spec = families.get("rar")
    assert set(spec.sampling) == set(readme)
    for size, (t, g, p) in readme.items():
        assert spec.sampling[size] == {"guidance_scale": g, "guidance_power": p, "temperature": t}
        inspect.signature(sample).bind(None, None, **spec.sampling[size])


# --------------------------------------------------------------------------------------------------
# (c) bad input names the key
# --------------------------------------------------------------------------------------------------


def test_another_familys_release_is_refused_naming_its_key():
    maskbit = {  # the start of a released MaskBit generator (modeling/bert.py LFQBert)
        "token_emb.weight": torch.zeros(64, 8), "class_emb.weight": torch.zeros(11, 64),
        "pos_emb": torch.zeros(1, 65, 64), "bits_to_indices": torch.tensor([1, 2, 4, 8])}
    with pytest.raises(ValueError, match="'token_emb.weight' is not a key of a released RAR"):
        load_official(maskbit, TINY)
    with pytest.raises(ValueError, match="token_emb.weight"):
        official_key_map(maskbit)


def test_a_vgen_export_is_not_a_release(released):
    vgen_state = load_official(released, TINY).state_dict()
    with pytest.raises(ValueError, match="'pos_embed' has 66 rows.*vgen export"):
        official_key_map(vgen_state)


@pytest.mark.parametrize("key", ["blocks.1.attn.k_norm.bias", "blocks.0.adaLN_modulation.1.weight",
                                 "lm_head.bias", "timesteps_embeddings"])
def test_a_missing_key_is_named(released, key):
    state = {k: v for k, v in released.items() if k != key}
    with pytest.raises(ValueError, match=f"no '{re.escape(key)}'"):
        load_official(state, TINY)


def test_a_wrong_shape_is_named_with_the_expected_one(released):
    state = dict(released, **{"blocks.0.mlp.fc1.weight": torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.weight' has shape \(128, 64\).*"
                                         r"expects \(256, 64\)"):
        load_official(state, TINY)
    # a release of another L: the first table is named with both released shapes
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 1088, 64\).*"
                                         r"expects \(1, 1056, 64\)"):
        load_official(released, rar_config("tiny", seq_len=32))
    # inconsistent tables: not a release
    state = dict(released, pos_embed=released["pos_embed"][:, :1000])
    with pytest.raises(ValueError, match="'pos_embed' has 1000 rows"):
        load_official(state, TINY)
    # an extra block (depth 3 checkpoint into depth 2)
    state = dict(released, **{"blocks.2.norm1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="'blocks.2.norm1.weight' has no place"):
        load_official(state, TINY)
