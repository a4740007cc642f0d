"""Released TiTok MaskGIT generators: names and shapes, strict loading, the official forward.

The reference below restates bytedance/1d-tokenizer @942a96f `modeling/maskgit.py` (ImageBert:
HF `BertModel(add_pooling_layer=False)` + `model.lm_head`, its `forward` and `generate`) with
HF BERT's module names (BertEmbeddings, BertSelfAttention, BertSelfOutput, BertIntermediate,
BertOutput; post-norm, exact GELU, LayerNorm eps 1e-12), so its state dict is a release.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from vgen_core import families
from vgen_core.generators.masked import (
    MASKGIT_SAMPLING,
    MASKGIT_SIZES,
    OFFICIAL_DROPPED,
    MaskGIT,
    load_official,
    maskgit_config,
    official_key_map,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# The official module, restated (transformers BertModel as ImageBert builds it; dropout off)
# --------------------------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, D: int, max_pos: int, *, persistent_ids: bool) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, D)
        self.position_embeddings = nn.Embedding(max_pos, D)
        self.token_type_embeddings = nn.Embedding(2, D)  # type_vocab_size default
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12)
        # transformers < 4.31 saved position_ids; later versions register it non-persistent
        self.register_buffer("position_ids", torch.arange(max_pos).expand((1, -1)),
                             persistent=persistent_ids)
        self.register_buffer("token_type_ids", torch.zeros(1, max_pos, dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        S = input_ids.shape[1]
        token_type_ids = self.token_type_ids[:, :S].expand(input_ids.shape[0], S)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(self.position_ids[:, :S])
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, D: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def _split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3)
        return ctx.reshape(*ctx.shape[:2], -1)


class _DenseNorm(nn.Module):  # BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)
    def __init__(self, d_in: int, D: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, D), nn.LayerNorm(D, eps=1e-12)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, D: int, heads: int) -> None:
        super().__init__()
        self.self = _SelfAttention(D, heads)
        self.output = _DenseNorm(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, D: int, M: int) -> None:
        super().__init__()
        self.dense = nn.Linear(D, M)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # hidden_act "gelu": exact erf GELU


class _Layer(nn.Module):
    def __init__(self, D: int, heads: int, M: int) -> None:
        super().__init__()
        self.attention = _Attention(D, heads)
        self.intermediate = _Intermediate(D, M)
        self.output = _DenseNorm(M, D)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, D: int, depth: int, heads: int, M: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(D, heads, M) for _ in range(depth))


class _BertModel(nn.Module):
    def __init__(self, vocab: int, D: int, depth: int, heads: int, M: int, max_pos: int,
                 V: int, *, persistent_ids: bool) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, D, max_pos, persistent_ids=persistent_ids)
        self.encoder = _Encoder(D, depth, heads, M)
        self.lm_head = nn.Linear(D, V, bias=True)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x)
        return x


class OfficialImageBert(nn.Module):
    def __init__(self, V: int, C: int, L: int, D: int, depth: int, heads: int, M: int, *,
                 persistent_ids: bool = False) -> None:
        super().__init__()
        self.target_codebook_size, self.condition_num_classes = V, C
        self.image_seq_len, self.mask_token_id = L, V
        self.model = _BertModel(V + C + 2, D, depth, heads, M, L + 1, V,
                                persistent_ids=persistent_ids)

    def forward(self, input_ids: Tensor, condition: Tensor, cond_drop_prob: float = 0.1) -> Tensor:
        drop_label_mask = torch.rand_like(condition, dtype=torch.float) < cond_drop_prob
        condition = condition + self.target_codebook_size + 1
        condition[drop_label_mask] = self.condition_num_classes + self.target_codebook_size + 1
        input_ids = torch.cat([condition.view(condition.shape[0], -1),
                               input_ids.view(input_ids.shape[0], -1)], dim=1)
        return self.model.lm_head(self.model(input_ids)[:, 1:])

    @torch.no_grad()
    def generate(self, condition: Tensor, guidance_scale: float, guidance_decay: str,
                 guidance_scale_pow: float, randomize_temperature: float,
                 softmax_temperature_annealing: bool, num_sample_steps: int) -> Tensor:
        ids = torch.full((condition.shape[0], self.image_seq_len), self.mask_token_id)
        cfg_scale = guidance_scale if guidance_decay == "constant" else 0.0

        def gumbel(t: Tensor) -> Tensor:
            noise = torch.zeros_like(t).uniform_(0, 1)
            return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))

        for step in range(num_sample_steps):
            ratio = 1.0 * (step + 1) / num_sample_steps
            annealed_temp = randomize_temperature * (1.0 - ratio)
            is_mask = ids == self.mask_token_id
            if guidance_decay == "power-cosine":
                pow_ = torch.ones(1) * guidance_scale_pow
                scale_step = (1 - torch.cos(((step / num_sample_steps) ** pow_) * torch.pi)) / 2
                cfg_scale = (guidance_scale - 1) * scale_step + 1
            if cfg_scale != 0:
                cond_logits = self.forward(ids, condition, cond_drop_prob=0.0)
                uncond_logits = self.forward(ids, condition, cond_drop_prob=1.0)
                if guidance_decay == "power-cosine":
                    logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale
                else:
                    logits = cond_logits + (cond_logits - uncond_logits) * cfg_scale
            else:
                logits = self.forward(ids, condition, cond_drop_prob=0.0)
            if softmax_temperature_annealing:
                logits = logits / (0.5 + 0.8 * (1 - ratio))
            sampled_ids = (logits + annealed_temp * gumbel(logits)).argmax(dim=-1)
            sampled_logits = torch.gather(logits, -1, sampled_ids[..., None]).squeeze(-1)
            sampled_ids = torch.where(is_mask, sampled_ids, ids)
            sampled_logits = torch.where(is_mask, sampled_logits, +np.inf).float()
            mask_ratio = np.arccos(ratio) / (math.pi * 0.5)
            mask_len = torch.Tensor([np.floor(self.image_seq_len * mask_ratio)])
            mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(
                torch.sum(is_mask, dim=-1, keepdims=True) - 1, mask_len))[0].squeeze()
            confidence = sampled_logits + annealed_temp * gumbel(sampled_logits)
            sorted_confidence, _ = torch.sort(confidence, dim=-1)
            cut_off = sorted_confidence[:, mask_len.long() - 1:mask_len.long()]
            masking = confidence <= cut_off
            ids = sampled_ids if step == num_sample_steps - 1 else torch.where(
                masking, self.mask_token_id, sampled_ids)
            if guidance_decay == "linear":
                cfg_scale = ratio * guidance_scale
        return ids


# --------------------------------------------------------------------------------------------------
# Released names and shapes, written from modeling/maskgit.py and configs/infer/TiTok
# --------------------------------------------------------------------------------------------------

#: configs/infer/TiTok/titok_{l32,b64}.yaml: model_type ViT, hidden 768, 24 layers, 16 heads,
#: intermediate 3072, codebook 4096, 1000 classes; image_seq_len = num_latent_tokens
RELEASES = {"generator_titok_l32": 32, "generator_titok_b64": 64}
RELEASE_SIZE = {"generator_titok_l32": "titok-l32", "generator_titok_b64": "titok-b64"}


def released_shapes(D: int = 768, depth: int = 24, M: int = 3072, L: int = 64, V: int = 4096,
                    C: int = 1000) -> dict[str, tuple[int, ...]]:
    e = "model.embeddings."
    s: dict[str, tuple[int, ...]] = {
        e + "word_embeddings.weight": (V + C + 2, D), e + "position_embeddings.weight": (L + 1, D),
        e + "token_type_embeddings.weight": (2, D), e + "LayerNorm.weight": (D,),
        e + "LayerNorm.bias": (D,), "model.lm_head.weight": (V, D), "model.lm_head.bias": (V,),
    }
    for i in range(depth):
        p = f"model.encoder.layer.{i}."
        for name, w, b in (("attention.self.query", (D, D), (D,)),
                           ("attention.self.key", (D, D), (D,)),
                           ("attention.self.value", (D, D), (D,)),
                           ("attention.output.dense", (D, D), (D,)),
                           ("attention.output.LayerNorm", (D,), (D,)),
                           ("intermediate.dense", (M, D), (M,)),
                           ("output.dense", (D, M), (D,)), ("output.LayerNorm", (D,), (D,))):
            s[f"{p}{name}.weight"], s[f"{p}{name}.bias"] = w, b
    return s


TINY = maskgit_config("tiny")  # V 256, L 64, C 10, D 64, depth 2, 4 heads, MLP 256


def _official_tiny(seed: int = 0, **kw) -> OfficialImageBert:
    torch.manual_seed(seed)
    ref = OfficialImageBert(TINY.codebook_size, TINY.num_classes, TINY.seq_len, TINY.hidden,
                            TINY.depth, TINY.heads, TINY.mlp_dim, **kw)
    with torch.no_grad():  # random everything (LayerNorms too), so every tensor matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref.eval()


@pytest.fixture(scope="module")
def official() -> OfficialImageBert:
    return _official_tiny()


@pytest.fixture(scope="module")
def released(official) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in official.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# (a) names and shapes convert strictly
# --------------------------------------------------------------------------------------------------


def test_restated_official_module_has_the_released_names_and_shapes(official):
    want = released_shapes(TINY.hidden, TINY.depth, TINY.mlp_dim, TINY.seq_len,
                           TINY.codebook_size, TINY.num_classes)
    assert {k: tuple(v.shape) for k, v in official.state_dict().items()} == want


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_release_converts_strictly_on_meta(release):
    L = RELEASES[release]
    shapes = released_shapes(L=L)
    assert sum(torch.Size(s).numel() for s in shapes.values()) / 1e6 == pytest.approx(177, abs=0.5)
    cfg = MASKGIT_SIZES[RELEASE_SIZE[release]]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.layer_norm_eps) == \
        (768, 24, 16, 3072, 1e-12)
    assert (cfg.codebook_size, cfg.seq_len, cfg.num_classes) == (4096, L, 1000)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = official_key_map(state)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MaskGIT(cfg).state_dict().items()}
        model = load_official(state, release)  # the release name resolves to the size
        assert isinstance(model, MaskGIT) and not model.training
        logits = model(torch.zeros(2, L, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert tuple(logits.shape) == (2, L, 4096)


def test_b64_is_the_default_b_size_and_sampling_is_the_released_per_size():
    assert MASKGIT_SIZES["titok-b64"] == MASKGIT_SIZES["B"]
    spec = families.get("maskgit")
    assert spec.load_official is load_official
    # configs/infer/TiTok/titok_{l32,b64}.yaml + sample_imagenet_titok.py (annealing on)
    assert spec.sampling["titok-l32"] == MASKGIT_SAMPLING["titok_l32"] == {
        "steps": 8, "guidance_scale": 4.5, "guidance_decay": "linear", "guidance_scale_pow": 3.0,
        "randomize_temperature": 9.5, "softmax_temperature_annealing": True}
    assert spec.sampling["titok-b64"] == spec.sampling["B"] == MASKGIT_SAMPLING["titok_b64"]


def test_tables_are_split_and_the_token_type_row_folded(released):
    mapped = official_key_map(released)
    V, e = TINY.codebook_size, "model.embeddings."
    word = released[e + "word_embeddings.weight"]
    assert torch.equal(mapped["token_emb.weight"], word[: V + 1])
    assert torch.equal(mapped["class_emb.weight"], word[V + 1:])
    assert torch.equal(mapped["pos_emb"][0], released[e + "position_embeddings.weight"]
                       + released[e + "token_type_embeddings.weight"][0])
    assert torch.equal(mapped["blocks.1.qkv.weight"], torch.cat(
        [released[f"model.encoder.layer.1.attention.self.{n}.weight"]
         for n in ("query", "key", "value")]))
    assert "model.embeddings.token_type_embeddings.weight[1:]" in OFFICIAL_DROPPED


def test_load_official_from_safetensors_and_position_ids_buffer(tmp_path, released):
    path = tmp_path / "generator_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    model = families.get("maskgit").load_official(path, TINY)
    assert not model.training
    assert torch.equal(model.state_dict()["head.weight"], released["model.lm_head.weight"])
    with pytest.raises(ValueError, match="pickle"):  # a .bin pickle is refused (never unpickled)
        load_official(tmp_path / "generator_titok_b64.bin", "titok-b64")
    # transformers < 4.31 saved the position_ids buffer: checked and dropped
    old = _official_tiny(persistent_ids=True).state_dict()
    assert "model.embeddings.position_ids" in old
    load_official(old, TINY)
    bad = dict(old, **{"model.embeddings.position_ids": torch.zeros(1, 65, dtype=torch.long)})
    with pytest.raises(ValueError, match="'model.embeddings.position_ids' is not the fixed"):
        load_official(bad, TINY)


def test_weights_inspect_matches_a_release_through_the_key_map(tmp_path, released, capsys):
    from pipelines.cli import main

    path = tmp_path / "maskgit_release.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["match"]
    assert (m["family"], m["size"], m["key_map"]) == ("maskgit", "tiny", True)
    assert m["missing"] == m["unexpected"] == m["mismatched"] == []


def test_weights_convert_of_a_released_bin_reports_the_dropped_rows(tmp_path, capsys):
    from pipelines.cli import main
    from vgen_core.tokenizers.io import load_pretrained

    old = _official_tiny(persistent_ids=True).state_dict()
    path = tmp_path / "generator_tiny.bin"
    torch.save(old, path)  # the releases are .bin pickles (read weights-only)
    assert main(["weights", "convert", "--family", "maskgit", "--size", "tiny", "--json",
                 str(path), str(tmp_path / "maskgit")]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["names"] == "released"
    assert sorted(manifest["dropped"]) == ["model.embeddings.position_ids",
                                           "model.embeddings.token_type_embeddings.weight[1:]"]
    model = load_pretrained(tmp_path / "maskgit")
    assert torch.equal(model.state_dict()["class_emb.weight"],
                       old["model.embeddings.word_embeddings.weight"][TINY.codebook_size + 1:])


# --------------------------------------------------------------------------------------------------
# (b) numerics: vgen's logits equal the official forward's on the same weights
# --------------------------------------------------------------------------------------------------


def test_logits_equal_the_official_forward(official, released):
    model = load_official(released, TINY)
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, TINY.seq_len, TINY.codebook_size
    tokens = torch.randint(0, V + 1, (B, L), generator=g)  # mask id V included
    labels = torch.tensor([0, 4, TINY.num_classes - 1])
    with torch.no_grad():
        ref = official(tokens, labels, cond_drop_prob=0.0)
        ours = model(tokens, labels)
        ref_null = official(tokens, labels, cond_drop_prob=1.0)  # the drop label V + C + 1
        ours_null = model(tokens, torch.full_like(labels, model.null_class_id))
    assert ref.shape == (B, L, V)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_null, ref_null)


@pytest.mark.parametrize("setting", ["titok_l32", "titok_b64", "titok_s128"])
def test_released_sampling_settings_reproduce_official_generate(official, released, setting):
    """`sample(**MASKGIT_SAMPLING[...])` = official generate token for token under one global
    seed. The official forward draws `rand_like(condition)` for its class drop on every call;
    a pre-hook draws the same numbers on vgen's model so both consume the global stream alike."""
    model = load_official(released, TINY)

    def draw_like_the_official_class_drop(module: nn.Module, args: tuple) -> None:
        torch.rand(args[1].shape[0])

    model.register_forward_pre_hook(draw_like_the_official_class_drop)
    kw = MASKGIT_SAMPLING[setting]
    labels = torch.tensor([2, 9, 5])
    torch.manual_seed(5)
    ref = official.generate(labels, kw["guidance_scale"], kw["guidance_decay"],
                            kw["guidance_scale_pow"], kw["randomize_temperature"],
                            kw["softmax_temperature_annealing"], kw["steps"])
    torch.manual_seed(5)
    ours = sample(model, labels, **kw)
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------------------------------
# (c) bad input names the key
# --------------------------------------------------------------------------------------------------


def test_another_familys_release_is_refused_naming_its_key(released):
    rar = {"cls_token": torch.zeros(1, 1, 64), "embeddings.weight": torch.zeros(1282, 64)}
    with pytest.raises(ValueError, match="'cls_token' is not a key of a released TiTok MaskGIT"):
        load_official(rar, TINY)
    with pytest.raises(ValueError, match="cls_token"):
        official_key_map(rar)
    vgen_state = load_official(released, TINY).state_dict()  # a vgen export is not a release
    with pytest.raises(ValueError, match="'pos_emb' is not a key"):
        official_key_map(vgen_state)
    uvit = {"embeddings.weight": torch.zeros(5098, 8), "in_blocks.0.norm1.weight": torch.ones(8)}
    with pytest.raises(ValueError, match="'in_blocks.0.norm1.weight' belongs to a UViTBert"):
        official_key_map(uvit)
    with pytest.raises(ValueError, match="UViTBert"):
        load_official(uvit, "generator_titok_s128")


@pytest.mark.parametrize("key", ["model.encoder.layer.1.attention.self.key.bias",
                                 "model.encoder.layer.0.output.LayerNorm.weight",
                                 "model.lm_head.bias", "model.embeddings.token_type_embeddings.weight"])
def test_a_missing_key_is_named(released, key):
    state = {k: v for k, v in released.items() if k != key}
    with pytest.raises(ValueError, match=f"no '{re.escape(key)}'"):
        load_official(state, TINY)


def test_a_wrong_shape_is_named_with_the_expected_one(released):
    key = "model.encoder.layer.0.intermediate.dense.weight"
    state = dict(released, **{key: torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}' has shape \(128, 64\).*"
                                         r"expects \(256, 64\)"):
        load_official(state, TINY)
    # a release of another L (L-32 weights into a 64-token config)
    with pytest.raises(ValueError, match=r"'model.embeddings.position_embeddings.weight' has shape "
                                         r"\(65, 64\).*expects \(33, 64\)"):
        load_official(released, maskgit_config("tiny", seq_len=32))
    # q / k / v of different shapes: named by the key map
    q = "model.encoder.layer.0.attention.self.key.weight"
    with pytest.raises(ValueError, match=rf"'{re.escape(q)}' has shape \(32, 64\)"):
        official_key_map(dict(released, **{q: torch.zeros(32, 64)}))
    # an extra layer (depth 3 checkpoint into depth 2)
    extra = "model.encoder.layer.2.output.dense.bias"
    with pytest.raises(ValueError, match=f"'{re.escape(extra)}' has no place"):
        load_official(dict(released, **{extra: torch.zeros(64)}), TINY)
