"""Released MaskGen-VQ generators: names and shapes, strict loading, the official forward.

The reference below restates bytedance/1d-tokenizer @942a96f `modeling/maskgen.py` (MaskGen_VQ:
forward, get_sinusoidal_encoding, concat_micro_cond, generate) with diffusers' module names
(JointTransformerBlock, AdaLayerNormZero, AdaLayerNormContinuous, Attention +
JointAttnProcessor2_0, FeedForward "gelu-approximate") and `modules/blocks.py` WeightTiedLMHead,
so its state dict is a release. The CLIP text features are inputs (the release holds no text
encoder); `generate` takes them where the official calls `open_clip_text_encoding`.
"""

from __future__ import annotations

import inspect
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
from vgen_core.generators.maskgen import (
    CLIP_TEXT_WIDTH,
    MASKGEN_SAMPLING,
    MASKGEN_SIZES,
    OFFICIAL_DROPPED,
    MaskGen,
    load_official,
    maskgen_config,
    official_key_map,
    sample,
    sample_from_features,
)
from vgen_core.generators.text import encode_text

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# The official module, restated (diffusers blocks; dropout off)
# --------------------------------------------------------------------------------------------------


class _AdaLayerNormZero(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 6 * D)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(
            F.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class _AdaLayerNormContinuous(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 2 * D)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = torch.chunk(self.linear(F.silu(cond)), 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class _GELU(nn.Module):
    def __init__(self, D: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(D, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELU(D, 4 * D), nn.Dropout(0.0), nn.Linear(4 * D, D)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class _Attention(nn.Module):
    def __init__(self, D: int, heads: int, context_pre_only: bool) -> None:
        super().__init__()
        self.heads, self.context_pre_only = heads, context_pre_only
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.add_k_proj, self.add_v_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.add_q_proj = nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D), nn.Dropout(0.0)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(D, D)

    def forward(self, hidden: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        B, n = hidden.shape[0], hidden.shape[1]

        def split(t: Tensor) -> Tensor:
            return t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q = torch.cat([split(self.to_q(hidden)), split(self.add_q_proj(context))], dim=2)
        k = torch.cat([split(self.to_k(hidden)), split(self.add_k_proj(context))], dim=2)
        v = torch.cat([split(self.to_v(hidden)), split(self.add_v_proj(context))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, q.shape[1] * q.shape[-1])
        hidden, context = out[:, :n], out[:, n:]
        if not self.context_pre_only:
            context = self.to_add_out(context)
        return self.to_out[1](self.to_out[0](hidden)), context


class _JointTransformerBlock(nn.Module):
    def __init__(self, D: int, heads: int, context_pre_only: bool) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = _AdaLayerNormZero(D)
        self.norm1_context = (_AdaLayerNormContinuous(D) if context_pre_only
                              else _AdaLayerNormZero(D))
        self.attn = _Attention(D, heads, context_pre_only)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ff = _FeedForward(D)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.ff_context = _FeedForward(D)

    def forward(self, hidden: Tensor, context: Tensor, temb: Tensor) -> tuple[Tensor | None, Tensor]:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden, temb)
        if self.context_pre_only:
            norm_context = self.norm1_context(context, temb)
        else:
            norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                context, temb)
        attn_output, context_attn_output = self.attn(norm_hidden, norm_context)
        hidden = hidden + gate_msa.unsqueeze(1) * attn_output
        norm_hidden = self.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden = hidden + gate_mlp.unsqueeze(1) * self.ff(norm_hidden)
        if self.context_pre_only:
            return None, hidden
        context = context + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_context = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return context + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_context), hidden


class _WeightTiedLMHead(nn.Module):
    def __init__(self, embeddings: nn.Embedding, V: int) -> None:
        super().__init__()
        self.weight = embeddings.weight
        self.target_codebook_size = V

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight[: self.target_codebook_size].t())


class OfficialMaskGenVQ(nn.Module):
    def __init__(self, V: int, L: int, D: int, depth: int, heads: int, micro_dim: int,
                 C: int = 1000, E: int = 768, sample_aesthetic_score: float = 6.5) -> None:
        super().__init__()
        self.micro_condition_embed_dim = micro_dim
        self.sample_aesthetic_score = sample_aesthetic_score
        self.text_embed_proj = nn.Linear(E, D)
        self.cond_pooled_proj = nn.Linear(E + micro_dim, D)
        self.blocks = nn.ModuleList([_JointTransformerBlock(D, heads, d == depth - 1)
                                     for d in range(depth)])
        self.norm = _AdaLayerNormContinuous(D)
        self.embeddings = nn.Embedding(V + 1 + C + 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.lm_head = _WeightTiedLMHead(self.embeddings, V)
        self.image_seq_len, self.mask_token_id = L, V

    def get_sinusoidal_encoding(self, timesteps: Tensor, max_period: int = 1000) -> Tensor:
        half_dim = self.micro_condition_embed_dim // 2
        exponent = -math.log(max_period) * torch.arange(0, half_dim, dtype=torch.float32)
        emb = torch.exp(exponent / half_dim)
        emb = timesteps[:, None].float() * emb[None, :]
        return torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)

    def concat_micro_cond(self, condition: Tensor, aesthetic_score: Tensor) -> Tensor:
        conds = [condition.squeeze(1), self.get_sinusoidal_encoding(aesthetic_score * 100)]
        return torch.cat(conds, dim=-1).unsqueeze(1)

    def forward(self, input_tokens: Tensor, condition: Tensor, condition_pooled: Tensor,
                aesthetic_score: Tensor) -> Tensor:
        """Eval-mode forward; condition_pooled (B, 1, E) as open_clip_text_encoding returns it."""
        x = self.embeddings(input_tokens)
        condition = self.text_embed_proj(condition)
        condition_pooled = self.cond_pooled_proj(
            self.concat_micro_cond(condition_pooled, aesthetic_score))
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            condition, x = blk(x, condition, condition_pooled.squeeze(1))
        return self.lm_head(self.norm(x, condition_pooled.squeeze(1)))

    @torch.no_grad()
    def generate(self, condition: Tensor, condition_pooled: Tensor, none_cond: Tensor,
                 none_cond_pooled: Tensor, guidance_scale: float = 12.0,
                 randomize_temperature: float = 1.5, sample_aesthetic_score: float | None = None,
                 softmax_temperature_annealing: bool = True, num_sample_steps: int = 16,
                 guidance_decay: str = "cosine", guidance_decay_scale_pow: float = 1.0) -> Tensor:
        """MaskGen_VQ.generate (prob_sorting=True) with the open_clip features given."""
        num_samples = condition.shape[0]
        none_cond = none_cond.repeat(num_samples, 1, 1)
        none_cond_pooled = none_cond_pooled.repeat(num_samples, 1, 1)
        ids = torch.full((num_samples, self.image_seq_len), self.mask_token_id)
        cfg_scale: float | Tensor = guidance_scale if guidance_decay == "none" else 0.0
        aes = None
        if sample_aesthetic_score is not None:  # the official uses the config's value
            aes = torch.full((num_samples * 2,), self.sample_aesthetic_score)

        def gumbel(t: Tensor) -> Tensor:
            noise = torch.zeros_like(t).uniform_(0, 1)
            return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))

        for step in range(num_sample_steps):
            ratio = 1.0 * (step + 1) / num_sample_steps
            annealed_temp = randomize_temperature * (1.0 - ratio)
            is_mask = ids == self.mask_token_id
            if guidance_decay == "cosine":
                scale_pow = torch.ones(1) * guidance_decay_scale_pow
                scale_step = (1 - torch.cos((ratio ** scale_pow) * torch.pi)) * 1 / 2
                cfg_scale = (guidance_scale - 1) * scale_step + 1
            elif guidance_decay == "linear":
                cfg_scale = ratio * (guidance_scale - 1) + 1
            assert aes is not None and bool(cfg_scale != 0)  # the released path
            logits = self.forward(torch.cat([ids, ids]), torch.cat([condition, none_cond]),
                                  torch.cat([condition_pooled, none_cond_pooled]), aes)
            cond_logits, uncond_logits = logits[:num_samples], logits[num_samples:]
            logits = cond_logits + (cond_logits - uncond_logits) * cfg_scale
            softmax_temperature = (0.5 + 0.8 * (1 - ratio) if softmax_temperature_annealing
                                   else annealed_temp)
            logits = logits / softmax_temperature
            sampled_ids = (logits + annealed_temp * gumbel(logits)).argmax(dim=-1)
            sampled_logits = torch.gather(logits, -1, sampled_ids[..., None]).squeeze(-1)
            sampled_ids = torch.where(is_mask, sampled_ids, ids)
            sampled_logits = torch.where(is_mask, sampled_logits, +np.inf).float()
            mask_ratio = torch.acos(torch.tensor(ratio)) / (math.pi * 0.5)  # arccos schedule
            mask_len = torch.floor(self.image_seq_len * mask_ratio)
            mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(
                torch.sum(is_mask, dim=-1, keepdims=True) - 1, mask_len))[0].squeeze()
            confidence = sampled_logits + annealed_temp * gumbel(sampled_logits)
            sorted_confidence, _ = torch.sort(confidence, dim=-1)
            cut_off = sorted_confidence[:, mask_len.long() - 1:mask_len.long()]
            masking = confidence <= cut_off
            ids = sampled_ids if step == num_sample_steps - 1 else torch.where(
                masking, self.mask_token_id, sampled_ids)
        return ids


# --------------------------------------------------------------------------------------------------
# Released names and shapes, written from modeling/maskgen.py, diffusers and configs/infer/MaskGen
# --------------------------------------------------------------------------------------------------

#: configs/infer/MaskGen/maskgen_vq_{l,xl}.yaml: decoder_embed_dim / decoder_depth, 16 heads,
#: micro_condition_embed_dim 256, 1000 (legacy) classes; TA-TiTok-BL-128 VQ: 128 tokens, C 8192
RELEASES = {"maskgen_vq_l": (1024, 16), "maskgen_vq_xl": (1280, 20)}
RELEASE_SIZE = {"maskgen_vq_l": "maskgen-vq-l", "maskgen_vq_xl": "maskgen-vq-xl"}


def released_shapes(D: int, depth: int, L: int = 128, V: int = 8192, micro: int = 256,
                    C: int = 1000, E: int = 768) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "text_embed_proj.weight": (D, E), "text_embed_proj.bias": (D,),
        "cond_pooled_proj.weight": (D, E + micro), "cond_pooled_proj.bias": (D,),
        "norm.linear.weight": (2 * D, D), "norm.linear.bias": (2 * D,),
        "embeddings.weight": (V + 1 + C + 1, D), "pos_embed": (1, L, D),
        "lm_head.weight": (V + 1 + C + 1, D),  # WeightTiedLMHead: the same tensor, saved twice
    }
    for i in range(depth):
        last = i == depth - 1
        lin = {"norm1.linear": (6 * D, D), "norm1_context.linear": ((2 if last else 6) * D, D),
               "attn.to_q": (D, D), "attn.to_k": (D, D), "attn.to_v": (D, D),
               "attn.add_k_proj": (D, D), "attn.add_v_proj": (D, D), "attn.add_q_proj": (D, D),
               "attn.to_out.0": (D, D), "ff.net.0.proj": (4 * D, D), "ff.net.2": (D, 4 * D)}
        if not last:
            lin |= {"attn.to_add_out": (D, D), "ff_context.net.0.proj": (4 * D, D),
                    "ff_context.net.2": (D, 4 * D)}
        for name, w in lin.items():
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = w, (w[0],)
    return s


#: the tiny size without a text encoder, with the release's 1001 legacy class rows
TINY = maskgen_config("tiny", text_encoder=None, legacy_class_rows=1001)


def _official_tiny(seed: int = 0) -> OfficialMaskGenVQ:
    torch.manual_seed(seed)
    ref = OfficialMaskGenVQ(TINY.codebook_size, TINY.seq_len, TINY.hidden, TINY.depth,
                            TINY.heads, TINY.micro_condition_dim)
    with torch.no_grad():  # random everything (adaLN not zero), so every tensor matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref.eval()


@pytest.fixture(scope="module")
def official() -> OfficialMaskGenVQ:
    return _official_tiny()


@pytest.fixture(scope="module")
def released(official) -> dict[str, Tensor]:
    """What torch.save(model.state_dict()) holds: lm_head.weight aliases embeddings.weight."""
    return dict(official.state_dict())


def _features(B: int, seed: int) -> tuple[Tensor, Tensor]:
    """Stand-ins for open_clip's (penultimate tokens (B, 77, 768), pooled (B, 768))."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 77, CLIP_TEXT_WIDTH, generator=g),
            torch.randn(B, CLIP_TEXT_WIDTH, generator=g))


# --------------------------------------------------------------------------------------------------
# (a) names and shapes convert strictly
# --------------------------------------------------------------------------------------------------


def test_restated_official_module_has_the_released_names_and_shapes(official):
    want = released_shapes(TINY.hidden, TINY.depth, TINY.seq_len, TINY.codebook_size,
                           TINY.micro_condition_dim)
    state = official.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert state["lm_head.weight"].data_ptr() == state["embeddings.weight"].data_ptr()


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_release_converts_strictly_on_meta(release):
    D, depth = RELEASES[release]
    shapes = released_shapes(D, depth)
    cfg = MASKGEN_SIZES[RELEASE_SIZE[release]]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.seq_len, cfg.codebook_size) == \
        (D, depth, 16, 128, 8192)
    assert (cfg.text_encoder, cfg.micro_condition_dim, cfg.legacy_class_rows) == (None, 256, 1001)
    assert cfg.default_aesthetic == 6.5
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = official_key_map(state)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MaskGen(cfg).state_dict().items()}
        model = load_official(state, release)  # the release name resolves to the size
        assert isinstance(model, MaskGen) and not model.training and model.text_encoder is None
        logits = model(torch.zeros(2, 128, dtype=torch.long), torch.empty(2, 77, 768),
                       torch.empty(2, 768), torch.full((2,), 6.5))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert tuple(logits.shape) == (2, 128, 8192)


def test_released_sizes_and_sampling_settings():
    spec = families.get("maskgen_vq")
    assert spec.load_official is load_official
    # configs/infer/MaskGen/maskgen_vq_{l,xl}.yaml (cfg 12.0, num_iter 16, temperature 2.0,
    # sample_aesthetic_score 6.5) + generate's defaults (cosine, pow 1.0, annealing on)
    want = {"steps": 16, "guidance_scale": 12.0, "guidance_decay": "cosine",
            "guidance_scale_pow": 1.0, "randomize_temperature": 2.0,
            "softmax_temperature_annealing": True, "aesthetic": 6.5}
    assert set(spec.sampling) == {"maskgen-vq-l", "maskgen-vq-xl"}
    for size in spec.sampling:
        assert spec.sampling[size] == MASKGEN_SAMPLING[size] == want
    # sample's defaults are the stage-1 training configs' (aesthetic 6.0)
    defaults = {k: p.default for k, p in inspect.signature(sample).parameters.items()
                if k in want}
    assert defaults == {**want, "aesthetic": 6.0}
    for size in ("L", "XL"):  # the training sizes keep vgen's byte-level text encoder
        assert MASKGEN_SIZES[size].text_encoder is not None
        assert MASKGEN_SIZES[size].model_copy(update={
            "text_encoder": None, "default_aesthetic": 6.5}) == MASKGEN_SIZES[
                f"maskgen-vq-{size.lower()}"]


def test_projections_are_fused_and_the_tied_head_dropped(released):
    mapped = official_key_map(released)
    assert "lm_head.weight" not in mapped and "lm_head.weight" in OFFICIAL_DROPPED
    assert not any(k.startswith("text_encoder.") for k in mapped)
    assert torch.equal(mapped["blocks.0.to_qkv.weight"], torch.cat(
        [released[f"blocks.0.attn.to_{n}.weight"] for n in "qkv"]))
    assert torch.equal(mapped["blocks.1.add_qkv.bias"], torch.cat(
        [released[f"blocks.1.attn.add_{n}_proj.bias"] for n in "qkv"]))
    assert mapped["blocks.0.ff_context.fc2.weight"] is released["blocks.0.ff_context.net.2.weight"]
    assert mapped["embeddings.weight"] is released["embeddings.weight"]


def test_load_official_from_safetensors_without_the_alias(tmp_path, released):
    # the HF (PyTorchModelHubMixin) export keeps one name for the shared tensor
    path = tmp_path / "maskgen_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in released.items() if k != "lm_head.weight"},
              str(path))
    model = families.get("maskgen_vq").load_official(path, TINY)
    assert not model.training
    assert torch.equal(model.embeddings.weight, released["embeddings.weight"])
    with pytest.raises(ValueError, match="pickle"):  # a .bin pickle is refused (never unpickled)
        load_official(tmp_path / "maskgen_vq_l.bin", "maskgen-vq-l")


def test_weights_convert_of_a_released_bin_reports_the_dropped_alias(tmp_path, released, capsys):
    from pipelines.cli import main
    from vgen_core.tokenizers.io import load_pretrained

    path = tmp_path / "maskgen_tiny.bin"
    torch.save(released, path)  # the releases are .bin pickles (read weights-only)
    assert main(["weights", "convert", "--family", "maskgen_vq", "--size", "tiny",
                 "--set", "text_encoder=null", "--set", "legacy_class_rows=1001", "--json",
                 str(path), str(tmp_path / "maskgen")]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["names"] == "released"
    assert sorted(manifest["dropped"]) == ["lm_head.weight"]
    model = load_pretrained(tmp_path / "maskgen")
    assert model.config == TINY
    assert torch.equal(model.state_dict()["blocks.1.to_out.weight"],
                       released["blocks.1.attn.to_out.0.weight"])


# --------------------------------------------------------------------------------------------------
# (b) numerics: vgen's logits equal the official forward's on the same weights
# --------------------------------------------------------------------------------------------------


def test_logits_equal_the_official_forward(official, released):
    model = load_official(released, TINY)
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, TINY.seq_len, TINY.codebook_size
    tokens = torch.randint(0, V + 1, (B, L), generator=g)  # mask id V included
    text, pooled = _features(B, 2)
    aes = torch.tensor([6.5, 5.0, 7.25])
    with torch.no_grad():
        ref = official(tokens, text, pooled[:, None], aes)
        ours = model(tokens, text, pooled, aes)
    assert ref.shape == (B, L, V)
    torch.testing.assert_close(ours, ref)


def test_released_sampling_settings_reproduce_official_generate(official, released):
    """`sample_from_features(**MASKGEN_SAMPLING["maskgen-vq-l"])` = official generate token for
    token under one global seed (both draw the same Gumbel noise in the same order)."""
    model = load_official(released, TINY)
    text, pooled = _features(2, 3)
    null_text, null_pooled = _features(1, 4)
    kw = MASKGEN_SAMPLING["maskgen-vq-l"]
    torch.manual_seed(5)
    ref = official.generate(text, pooled[:, None], null_text, null_pooled[:, None],
                            guidance_scale=kw["guidance_scale"],
                            randomize_temperature=kw["randomize_temperature"],
                            sample_aesthetic_score=kw["aesthetic"],
                            num_sample_steps=kw["steps"])
    torch.manual_seed(5)
    ours = sample_from_features(model, text, pooled, null_text, null_pooled, **kw)
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------------------------------
# (c) bad input names the key
# --------------------------------------------------------------------------------------------------


def test_a_model_without_text_encoder_refuses_byte_ids(released):
    model = load_official(released, TINY)
    with pytest.raises(ValueError, match="no text encoder.*CLIP ViT-L/14"):
        sample(model, encode_text(["a red cube"]))
    with pytest.raises(ValueError, match="maskgen-vq-l"):
        load_official(released, "L")  # the training size holds vgen's text encoder


def test_another_familys_release_is_refused_naming_its_key(released):
    maskgit = {"model.embeddings.word_embeddings.weight": torch.zeros(5098, 64),
               "model.lm_head.weight": torch.zeros(4096, 64)}
    with pytest.raises(ValueError, match="'model.embeddings.word_embeddings.weight' is not a key "
                                         "of a released MaskGen-VQ"):
        load_official(maskgit, TINY)
    with pytest.raises(ValueError, match="model.embeddings.word_embeddings.weight"):
        official_key_map(maskgit)
    torch.manual_seed(0)
    vgen_state = maskgen_config("tiny").build().state_dict()  # a vgen export is not a release
    with pytest.raises(ValueError, match=r"'text_encoder\.positional_embedding' is not a key"):
        official_key_map(vgen_state)


@pytest.mark.parametrize("key", ["blocks.0.attn.add_v_proj.bias", "blocks.1.norm1_context.linear.weight",
                                 "pos_embed", "blocks.0.ff_context.net.2.weight"])
def test_a_missing_key_is_named(released, key):
    state = {k: v for k, v in released.items() if k != key}
    with pytest.raises(ValueError, match=f"no '{re.escape(key)}'"):
        load_official(state, TINY)


def test_a_wrong_shape_is_named_with_the_expected_one(released):
    key = "blocks.0.ff.net.0.proj.weight"
    state = dict(released, **{key: torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}' has shape \(128, 64\).*"
                                         r"expects \(256, 64\)"):
        load_official(state, TINY)
    # no micro-condition rows / another text width
    with pytest.raises(ValueError, match=r"'cond_pooled_proj.weight' has shape \(64, 784\).*"
                                         r"expects \(64, 768\)"):
        load_official(released, TINY.model_copy(update={"micro_condition": False}))
    # q / k / v of different shapes: named by the key map
    q = "blocks.1.attn.to_v.weight"
    with pytest.raises(ValueError, match=rf"'{re.escape(q)}' has shape \(32, 64\)"):
        official_key_map(dict(released, **{q: torch.zeros(32, 64)}))
    # a head that is not the tied embedding table
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'embeddings.weight'"):
        load_official(dict(released, **{"lm_head.weight": released["embeddings.weight"] + 1}),
                      TINY)
    # an extra block (depth 3 checkpoint into depth 2)
    extra = "blocks.2.norm1.linear.bias"
    with pytest.raises(ValueError, match=f"'{re.escape(extra)}' has no place"):
        load_official(dict(released, **{extra: torch.zeros(384)}), TINY)
