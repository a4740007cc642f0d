"""Released BAR generator weights: names and shapes of every release, strict loading, the official
forward and sampler.

The reference below restates undefined443/BAR @faf903f (amazon-far/BAR author commit)
`modeling/generator.py` (BAR.forward_fn / generate, patch_size down/up-sampling),
`modeling/mbm_head.py` (MaskBitModelingHead.forward_fn / sample, ResBlock,
GaussianFourierEmbedding), `modeling/modules/blocks.py` (RMSNorm, SwiGLUFFN, Attention with
target-aware RoPE and KV cache, Block, FinalLayer) and `modeling/modules/rope.py`
(VisionRotaryEmbeddingFast, 'lang', num_cls_token) with the released table lengths and names, so
its state dict is a release (sample_imagenet.py loads the releases with a strict load_state_dict).
Dropout is left out (eval).
"""

from __future__ import annotations

import json
import math
import re
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from vgen_core import families
from vgen_core.generators.bar import (
    BAR,
    BAR_RELEASES,
    BAR_SAMPLING,
    BAR_SIZES,
    OFFICIAL_DROPPED,
    BARConfig,
    bar_config,
    load_official,
    official_key_map,
    sample,
)
from vgen_core.tokenizers.lfq import bits_to_indices, indices_to_bits

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# The official module, restated
# --------------------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):  # blocks.py RMSNorm: fp32, then * weight
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return out.to(x.dtype)


class _SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _Rope(nn.Module):  # rope.py VisionRotaryEmbeddingFast(dim, pt_seq_len, 'lang', num_cls_token)
    freqs_cos: Tensor
    freqs_sin: Tensor

    def __init__(self, dim: int, side: int, num_cls: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        t = torch.arange(side).float() / side * side
        freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
        freqs = torch.cat([freqs[:, None, :].expand(side, side, -1),  # broadcat: rows, columns
                           freqs[None, :, :].expand(side, side, -1)], dim=-1)
        freqs = freqs.reshape(side * side, -1)
        D = freqs.shape[-1]
        self.register_buffer("freqs_cos", torch.cat([torch.ones(num_cls, D), freqs.cos()]))
        self.register_buffer("freqs_sin", torch.cat([torch.zeros(num_cls, D), freqs.sin()]))

    def forward(self, t: Tensor, rope_order: Tensor) -> Tensor:
        dtype, t = t.dtype, t.float()
        cos, sin = self.freqs_cos[rope_order].unsqueeze(1), self.freqs_sin[rope_order].unsqueeze(1)
        x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (t * cos + rot * sin).to(dtype)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, rope: _Rope) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm, self.k_norm = _RMSNorm(self.head_dim), _RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.kv_cache = False
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def forward(self, x: Tensor, attn_mask, rope_order, target_rope_order) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        h = self.num_heads // 2
        q = torch.cat([self.rope(q[:, :h], rope_order), self.rope(q[:, h:], target_rope_order)], 1)
        k = self.rope(k, rope_order)
        if self.kv_cache:
            if self.k_cache is not None and self.v_cache is not None:
                k, v = torch.cat([self.k_cache, k], -2), torch.cat([self.v_cache, v], -2)
            self.k_cache, self.v_cache = k, v
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, rope: _Rope) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(dim)
        self.attn = _Attention(dim, heads, rope)
        self.norm2 = _RMSNorm(dim)
        self.mlp = _SwiGLUFFN(dim, int(2 / 3 * int(dim * 4.0)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, attn_mask, c, rope_order, target_rope_order):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1)
        x = x + g1 * self.attn(h, attn_mask, rope_order, target_rope_order)
        return x + g2 * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class _FinalLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = _RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.in_ln = _RMSNorm(ch)
        self.mlp = _SwiGLUFFN(ch, int(2 / 3 * int(ch * 4.0)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 3 * ch, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class _Fourier(nn.Module):
    def __init__(self, hidden: int, size: int = 256) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.normal(0, 1.0, (size,)), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        t = t[:, None] * self.W[None, :] * 2 * torch.pi
        return self.mlp(torch.cat([torch.sin(t), torch.cos(t)], dim=-1))


class OfficialMBMHead(nn.Module):
    def __init__(self, width: int, num_layers: int, seq_len: int) -> None:
        super().__init__()
        self.width, self.seq_len, self.num_layers = width, seq_len, num_layers
        e = math.ceil(width / seq_len)
        self.input_embed = nn.Embedding(3, e)
        self.input_proj = nn.Linear(e * seq_len, width, bias=True)
        self.ln_pre = _RMSNorm(width)
        self.transformer = nn.ModuleList(_ResBlock(width) for _ in range(num_layers))
        self.output_embed = nn.Linear(width, seq_len * 2, bias=True)
        self.mask_token_id = 2
        self.t_embedder = _Fourier(width)
        self.adaln_before_head = _FinalLayer(width)

    def forward_fn(self, masked_input_ids: Tensor, conditions: Tensor,
                   mask_ratio: Tensor) -> Tensor:
        inputs = self.input_proj(self.input_embed(masked_input_ids).flatten(1))
        s = F.silu(self.t_embedder(mask_ratio).unsqueeze(1) + conditions).squeeze(1)
        x = self.ln_pre(inputs)
        for blk in self.transformer:
            x = blk(x, s)
        x = self.output_embed(self.adaln_before_head(x, s))
        return x.reshape(x.shape[0], self.seq_len, 2)

    @torch.no_grad()
    def sample(self, conditions: Tensor, guidance_scale: float, randomize_temperature: float,
               tokens_allocation, use_cfg: bool) -> Tensor:
        def log(t, eps=1e-20):
            return torch.log(t.clamp(min=eps))

        def add_gumbel_noise(t, temperature):
            return t + temperature * -log(-log(torch.zeros_like(t).uniform_(0, 1)))

        batch = conditions.shape[0] // 2 if use_cfg else conditions.shape[0]
        n = len(tokens_allocation)
        cum = [0] + [sum(tokens_allocation[: i + 1]) for i in range(n)]
        ids = torch.full((batch, self.seq_len), self.mask_token_id)
        for step in range(n):
            mask_ratio = 1.0 - cum[step] / self.seq_len
            next_mask_ratio = 1.0 - cum[step + 1] / self.seq_len
            annealed_temp = randomize_temperature * (1.0 - step / n)
            mask_ratio_t = torch.tensor(mask_ratio, dtype=conditions.dtype)
            if use_cfg:
                logits = self.forward_fn(torch.cat([ids, ids]), conditions,
                                         mask_ratio_t.view(1).repeat(batch * 2))
                cond_logits, uncond_logits = torch.split(logits, batch, dim=0)
                logits = uncond_logits + guidance_scale * (cond_logits - uncond_logits)
            else:
                logits = self.forward_fn(ids, conditions, mask_ratio_t.view(1).repeat(batch))
            sampled_ids = add_gumbel_noise(logits, annealed_temp).argmax(dim=-1)
            sampled_logits = torch.gather(logits, -1, sampled_ids[..., None]).squeeze(-1)
            is_mask = ids == self.mask_token_id
            sampled_ids = torch.where(is_mask, sampled_ids, ids)
            sampled_logits = torch.where(is_mask, sampled_logits, torch.inf).float()
            if step == n - 1:
                ids = sampled_ids
            else:
                mask_len = torch.tensor([float(round(self.seq_len * next_mask_ratio))])
                mask_len = torch.maximum(torch.tensor([1.0]), torch.minimum(
                    is_mask.sum(-1, keepdim=True) - 1, mask_len))[0].squeeze()
                confidence = add_gumbel_noise(sampled_logits, annealed_temp)
                sorted_confidence, _ = torch.sort(confidence, dim=-1)
                cut_off = sorted_confidence[:, mask_len.long() - 1 : mask_len.long()]
                ids = torch.where(confidence <= cut_off, self.mask_token_id, sampled_ids)
        return ids


class OfficialBAR(nn.Module):
    """modeling/generator.py BAR (eval: dropout off), with the released table lengths."""

    def __init__(self, D: int, depth: int, heads: int, K: int, L: int, C: int, R: int = 32,
                 W: int = 2048, head_layers: int = 3, patch_size: int = 1) -> None:
        super().__init__()
        self.num_heads, self.patch_size, self.original_image_seq_len = heads, patch_size, L
        self.latent_height = self.latent_width = math.isqrt(L)
        self.image_seq_len = L // patch_size**2
        self.repeat_class_condition = R
        side = math.isqrt(self.image_seq_len)
        rope = _Rope((D // heads) // 2, side, 1 + R)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(_Block(D, heads, rope) for _ in range(depth))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.image_seq_len + 128, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, self.image_seq_len + 128, D))
        self.norm = _RMSNorm(D)
        self.base_vq_split_channel = K
        self.vq_split_channel = K * patch_size**2
        self.lm_head = OfficialMBMHead(W, head_layers, self.vq_split_channel)
        self.latent_condition_proj = nn.Linear(D, W)
        self.target_codebook_size = 2
        self.none_condition_id = C + 2 + 1
        self.embeddings = nn.Embedding(2 + 1 + C + 1, D)
        e = math.ceil(D / self.vq_split_channel)
        self.input_embeddings = nn.Embedding(3, e)
        self.input_merge = nn.Linear(e * self.vq_split_channel, D, bias=True)
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, self.image_seq_len + 100, D))
        n = self.image_seq_len + 128
        self.causal_mask: Tensor
        self.register_buffer("causal_mask", torch.full((n, n), float("-inf")).triu_(1),
                             persistent=False)

    def attns(self) -> list[_Attention]:
        return [cast(_Block, blk).attn for blk in self.blocks]

    def set_kv_cache(self, on: bool) -> None:
        for attn in self.attns():
            attn.kv_cache, attn.k_cache, attn.v_cache = on, None, None

    @staticmethod
    def shuffle(x: Tensor, orders: Tensor) -> Tensor:
        return x[torch.arange(x.shape[0]).unsqueeze(1).expand(-1, x.shape[1]), orders]

    @staticmethod
    def unshuffle(x: Tensor, orders: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        out[torch.arange(x.shape[0]).unsqueeze(1).expand(-1, x.shape[1]), orders] = x
        return out

    def _down(self, t: Tensor) -> Tensor:  # 'b (h sh w sw) n -> b (h w) (sh sw n)'
        p, h = self.patch_size, self.latent_height // self.patch_size
        B, _, n = t.shape
        return t.view(B, h, p, h, p, n).permute(0, 1, 3, 2, 4, 5).reshape(B, h * h, p * p * n)

    def _up(self, t: Tensor) -> Tensor:  # 'b (h w) (sh sw n) -> b (h sh w sw) n'
        p, h = self.patch_size, self.latent_height // self.patch_size
        B = t.shape[0]
        n = t.shape[-1] // (p * p)
        return t.view(B, h, h, p, p, n).permute(0, 1, 3, 2, 4, 5).reshape(B, h * p * h * p, n)

    def forward_fn(self, input_ids: Tensor, condition: Tensor, orders: Tensor | None = None,
                   is_sampling: bool = False) -> Tensor:
        """Training: (B, L', W) head conditions of the shuffled tokens (what forward feeds the
        head, x[:, :-1]); sampling: (B, S, W)."""
        if not is_sampling and self.patch_size > 1:
            input_ids = self._down(input_ids.reshape(
                input_ids.shape[0], self.original_image_seq_len, self.base_vq_split_channel))
        else:
            input_ids = input_ids.reshape(input_ids.shape[0], -1, self.vq_split_channel)
        B = input_ids.shape[0]
        if orders is None:
            orders = torch.arange(self.image_seq_len).unsqueeze(0).expand(B, -1)
        condition_token = self.embeddings(condition)
        input_embed = self.input_merge(self.input_embeddings(input_ids).flatten(2))
        R = self.repeat_class_condition
        embeddings = torch.cat([condition_token.unsqueeze(1).repeat(1, R, 1), input_embed], 1)
        pos_embed = self.pos_embed.repeat(B, 1, 1)
        prefix = 1 + R
        pos_embed_postfix = self.shuffle(pos_embed[:, prefix:prefix + self.image_seq_len], orders)
        tape = self.target_aware_pos_embed.repeat(B, 1, 1)
        target_orders = torch.cat([orders[:, 1:], orders[:, -1:]], dim=1)
        tape_shuffled = self.shuffle(tape[:, prefix:prefix + self.image_seq_len], target_orders)
        first = tape[torch.arange(B), orders[:, 0] + prefix].unsqueeze(1).expand(-1, prefix, -1)
        tape_full = torch.cat([first, tape_shuffled], dim=1)
        if not is_sampling:
            embeddings = torch.cat([embeddings[:, :R], self.shuffle(embeddings[:, R:], orders)], 1)
        x = torch.cat((self.cls_token.expand(B, -1, -1), embeddings), dim=1)
        x = x + torch.cat([pos_embed[:, :prefix], pos_embed_postfix], dim=1)[:, :x.shape[1]]
        x = x + tape_full[:, :x.shape[1]]
        c = condition_token.unsqueeze(1) + self.timesteps_embeddings[:, :x.shape[1]]
        S = x.shape[1]
        attn_mask: Tensor | None = self.causal_mask[:S, :S]
        rope_order = torch.cat([torch.arange(prefix).unsqueeze(0).expand(B, -1), orders + prefix],
                               1)[:, :S]
        target = torch.cat([(orders[:, :1] + prefix).expand(-1, prefix), target_orders + prefix],
                           1)[:, :S]
        attn = self.attns()[0]
        if attn.kv_cache and attn.k_cache is not None:
            x, c, attn_mask = x[:, -1:], c[:, -1:], None
            rope_order, target = rope_order[:, -1:], target[:, -1:]
        for blk in self.blocks:
            x = blk(x, attn_mask, c, rope_order, target)
        if not attn.kv_cache:
            x = x[:, prefix - 1:]
        x = self.latent_condition_proj(self.norm(x))
        return x if is_sampling else x[:, :-1]

    @torch.no_grad()
    def generate(self, condition: Tensor, guidance_scale: float, randomize_temperature: float,
                 tokens_allocation) -> Tensor:
        """BAR.generate(kv_cache=True, raster) -> (B, L * K) bits (preprocess_condition's drop
        draw, a no-op at cond_drop_prob 0, left out)."""
        condition = condition + self.target_codebook_size + 1
        n = condition.shape[0]
        ids = torch.full((n, 0), -1)
        self.set_kv_cache(True)
        use_cfg = guidance_scale > 1.0
        W = self.lm_head.width
        for step in range(self.image_seq_len):
            ratio = step / self.image_seq_len
            cfg_scale = 1.0 + (guidance_scale - 1.0) * ratio if use_cfg else 1.0
            if use_cfg:
                lat = self.forward_fn(torch.cat([ids, ids]), torch.cat(
                    [condition, torch.full_like(condition, self.none_condition_id)]),
                    is_sampling=True)[:, -1].reshape(-1, 1, W)
            else:
                lat = self.forward_fn(ids, condition, is_sampling=True)[:, -1].reshape(-1, 1, W)
            sampled = self.lm_head.sample(lat, cfg_scale, randomize_temperature,
                                          list(tokens_allocation), use_cfg)
            ids = torch.cat((ids, sampled), dim=-1)
        self.set_kv_cache(False)
        ids = ids.view(n, self.image_seq_len, self.vq_split_channel)
        if self.patch_size > 1:
            ids = self._up(ids)
        return ids.reshape(n, -1)


# --------------------------------------------------------------------------------------------------
# Released names and shapes, written from modeling/generator.py + configs/generator/*.yaml
# --------------------------------------------------------------------------------------------------

#: README "Model Zoo" release -> (hidden, depth, heads, token_size, image_seq_len, patch_size,
#: README size in M parameters, vgen size); 1000 classes, repeat_class_condition 32, head 2048 x 3
RELEASES = {
    "bar_b": (768, 24, 12, 16, 256, 1, 415, "B"),
    "bar_b_patch2": (768, 24, 12, 16, 256, 2, 415, "B-patch2"),
    "bar_b_patch4": (768, 24, 12, 16, 256, 4, 416, "B-patch4"),
    "bar_l": (1280, 32, 16, 16, 256, 1, 1100, "L"),
    "bar_l_res512": (1280, 32, 16, 10, 1024, 1, 1100, "L-res512"),
}


def released_shapes(D: int, depth: int, H: int, K: int, L: int, p: int = 1, C: int = 1000,
                    R: int = 32, W: int = 2048, head_layers: int = 3) -> dict[str, tuple[int, ...]]:
    T, J, P, d = L // p**2, K * p**2, 1 + R, D // H
    F_, G = int(2 / 3 * int(4 * D)), int(2 / 3 * int(4 * W))
    e, eh = math.ceil(D / J), math.ceil(W / J)
    s: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D), "embeddings.weight": (2 + 1 + C + 1, D),
        "input_embeddings.weight": (3, e), "input_merge.weight": (D, e * J),
        "input_merge.bias": (D,), "pos_embed": (1, T + 128, D),
        "target_aware_pos_embed": (1, T + 128, D), "timesteps_embeddings": (1, T + 100, D),
        "norm.weight": (D,), "latent_condition_proj.weight": (W, D),
        "latent_condition_proj.bias": (W,), "lm_head.input_embed.weight": (3, eh),
        "lm_head.input_proj.weight": (W, eh * J), "lm_head.input_proj.bias": (W,),
        "lm_head.ln_pre.weight": (W,), "lm_head.output_embed.weight": (2 * J, W),
        "lm_head.output_embed.bias": (2 * J,), "lm_head.t_embedder.W": (256,),
        "lm_head.t_embedder.mlp.0.weight": (W, 512), "lm_head.t_embedder.mlp.0.bias": (W,),
        "lm_head.t_embedder.mlp.2.weight": (W, W), "lm_head.t_embedder.mlp.2.bias": (W,),
        "lm_head.adaln_before_head.norm_final.weight": (W,),
        "lm_head.adaln_before_head.adaLN_modulation.1.weight": (2 * W, W),
        "lm_head.adaln_before_head.adaLN_modulation.1.bias": (2 * W,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        s |= {b + "norm1.weight": (D,), b + "norm2.weight": (D,),
              b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
              b + "attn.q_norm.weight": (d,), b + "attn.k_norm.weight": (d,),
              b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
              b + "attn.rope.freqs_cos": (P + T, d), b + "attn.rope.freqs_sin": (P + T, d),
              b + "mlp.w12.weight": (2 * F_, D), b + "mlp.w12.bias": (2 * F_,),
              b + "mlp.w3.weight": (D, F_), b + "mlp.w3.bias": (D,),
              b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)}
    for j in range(head_layers):
        b = f"lm_head.transformer.{j}."
        s |= {b + "in_ln.weight": (W,), b + "mlp.w12.weight": (2 * G, W),
              b + "mlp.w12.bias": (2 * G,), b + "mlp.w3.weight": (W, G), b + "mlp.w3.bias": (W,),
              b + "adaLN_modulation.1.weight": (3 * W, W),
              b + "adaLN_modulation.1.bias": (3 * W,)}
    return s


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _tiny_cfg(K: int = 16, L: int = 16, p: int = 1) -> BARConfig:
    """tiny (D 64, depth 2, 4 heads, R 4, head 64 x 2, 10 classes) on K-bit tokens, L = side**2."""
    return bar_config("tiny", token_bits=K, seq_len=L, patch_size=p)


def _official_of(cfg: BARConfig, seed: int = 0) -> OfficialBAR:
    torch.manual_seed(seed)
    ref = OfficialBAR(cfg.hidden, cfg.depth, cfg.heads, cfg.token_bits, cfg.seq_len,
                      cfg.num_classes, R=cfg.repeat_class, W=cfg.head_width,
                      head_layers=cfg.head_layers, patch_size=cfg.patch_size)
    with torch.no_grad():  # random everything (adaLN not zero), so every tensor matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref.eval()


def _released(ref: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in ref.state_dict().items()}


#: tiny variants for the numerics: (token bits, tokens, patch size)
VARIANTS = {"K16": (16, 16, 1), "K10": (10, 16, 1), "K16-p2": (16, 16, 2), "K16-p4": (16, 16, 4),
            "K8-8x8-p2": (8, 64, 2)}

TINY = _tiny_cfg(8, 64)  # the registry's tiny (K 8, 8 x 8)


@pytest.fixture(scope="module")
def official() -> OfficialBAR:
    return _official_of(TINY)


@pytest.fixture(scope="module")
def released(official) -> dict[str, Tensor]:
    return _released(official)


# --------------------------------------------------------------------------------------------------
# (a) names and shapes convert strictly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", list(RELEASES))
def test_restated_official_module_has_the_released_names_shapes_and_sizes(release):
    D, depth, H, K, L, p, params_m, _ = RELEASES[release]
    with torch.device("meta"):
        ref = OfficialBAR(D, depth, H, K, L, 1000, patch_size=p)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        released_shapes(D, depth, H, K, L, p)
    total_m = sum(q.numel() for q in ref.parameters()) / 1e6  # as sample_imagenet.py counts
    assert total_m == pytest.approx(params_m, rel=0.01)  # README: 415M / 416M / 1.1B


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_release_converts_strictly_on_meta_and_runs(release):
    D, depth, H, K, L, p, _, size = RELEASES[release]
    assert BAR_RELEASES[release] == size
    cfg = BAR_SIZES[size]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.token_bits, cfg.seq_len, cfg.patch_size) == \
        (D, depth, H, K, L, p)
    assert (cfg.num_classes, cfg.repeat_class, cfg.head_width, cfg.head_layers, cfg.rope) == \
        (1000, 32, 2048, 3, True)
    assert cfg.dropout == (0.2 if size.startswith("L") else 0.0)  # yaml dropout (eval: off)
    state = _meta_state(released_shapes(D, depth, H, K, L, p))
    mapped = official_key_map(state)
    T, J = L // p**2, K * p**2
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in BAR(cfg).state_dict().items()}
        model = load_official(state, release)  # the release name resolves to the size
        assert isinstance(model, BAR) and not model.training
        bits = torch.zeros(2, L, K, dtype=torch.long)
        cond = model(model.to_steps(bits), torch.zeros(2, dtype=torch.long))
        logits = model.lm_head(torch.zeros(2 * T, J, dtype=torch.long), cond.reshape(2 * T, -1),
                               torch.ones(2 * T))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert tuple(cond.shape) == (2, T, 2048) and tuple(logits.shape) == (2 * T, J, 2)


def test_tables_are_sliced_and_rope_buffers_dropped(released):
    mapped = official_key_map(released)
    P, T = 1 + TINY.repeat_class, TINY.seq_len
    assert torch.equal(mapped["pos_embed"], released["pos_embed"][:, : P + T])
    assert torch.equal(mapped["target_aware_pos_embed"],
                       released["target_aware_pos_embed"][:, P : P + T])
    assert torch.equal(mapped["timesteps_embeddings"],
                       released["timesteps_embeddings"][:, : P + T])
    rope = {k for k in released if ".attn.rope." in k}
    assert len(rope) == 2 * TINY.depth and set(mapped) == set(released) - rope
    tables = ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
    assert all(mapped[k] is released[k] for k in mapped if k not in tables)
    dropped = " ".join(OFFICIAL_DROPPED)
    for name in (*tables, "attn.rope.freqs_cos", "attn.rope.freqs_sin"):
        assert name in dropped


def test_load_official_from_safetensors_and_spec(tmp_path, released):
    path = tmp_path / "bar_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    spec = families.get("bar")
    assert spec.load_official is load_official and "load_released" in spec.capabilities
    model = spec.load_official(path, TINY)
    assert not model.training
    assert torch.equal(model.state_dict()["lm_head.t_embedder.W"], released["lm_head.t_embedder.W"])
    with pytest.raises(ValueError, match="pickle"):  # a .bin is never unpickled here
        load_official(tmp_path / "bar_b.bin", "B")


def test_weights_inspect_matches_a_release_through_the_key_map(tmp_path, released, capsys):
    from pipelines.cli import main

    path = tmp_path / "bar_release.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["match"]
    assert (m["family"], m["size"], m["key_map"]) == ("bar", "tiny", True)
    assert m["missing"] == m["mismatched"] == []


# --------------------------------------------------------------------------------------------------
# (b) numerics: vgen's conditions / bit logits / samples equal the official ones, same weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_teacher_forced_conditions_and_head_logits_equal_the_official(variant):
    cfg = _tiny_cfg(*VARIANTS[variant])
    official = _official_of(cfg, seed=1)
    model = load_official(_released(official), cfg)
    g = torch.Generator().manual_seed(1)
    B, C, T, J, W = 3, cfg.num_classes, cfg.steps, cfg.step_bits, cfg.head_width
    bits = torch.randint(0, 2, (B, cfg.seq_len, cfg.token_bits), generator=g)
    labels = torch.tensor([3, 7, C])  # the last one is the null class
    orders = torch.stack([torch.randperm(T, generator=g), torch.arange(T),
                          torch.randperm(T, generator=g)])
    condition = torch.where(labels == C, official.none_condition_id, labels + 3)
    with torch.no_grad():
        ref = official.forward_fn(bits, condition, orders=orders)  # (B, T, W), generation order
        ours = model(model.to_steps(bits), labels, orders)  # (B, T, W), position order
        assert ref.shape == (B, T, W)
        torch.testing.assert_close(ours.gather(1, orders[..., None].expand(-1, -1, W)), ref)
        ids = torch.randint(0, 3, (2 * B, J), generator=g)
        cond = torch.randn(2 * B, W, generator=g)
        ratio = torch.rand(2 * B, generator=g)
        torch.testing.assert_close(model.lm_head(ids, cond, ratio),
                                   official.lm_head.forward_fn(ids, cond[:, None], ratio))
    # the patch layout is the official one: to_steps = _downsample_tokens, from_steps undoes it
    assert torch.equal(model.to_steps(bits), official._down(bits))
    assert torch.equal(model.from_steps(model.to_steps(bits)), bits)


@pytest.mark.parametrize("variant", ["K16", "K16-p2"])
def test_kv_cached_conditions_equal_the_official_sampling_forward(variant):
    cfg = _tiny_cfg(*VARIANTS[variant])
    official = _official_of(cfg, seed=2)
    model = load_official(_released(official), cfg)
    g = torch.Generator().manual_seed(2)
    B, T, J = 2, cfg.steps, cfg.step_bits
    steps = torch.randint(0, 2, (B, T, J), generator=g)
    labels = torch.tensor([1, 4])
    cache = model.new_kv_cache()
    official.set_kv_cache(True)
    try:
        with torch.no_grad():
            for n in range(T):
                ref = official.forward_fn(steps[:, :n].reshape(B, -1), labels + 3,
                                          is_sampling=True)[:, -1]
                torch.testing.assert_close(model.next_condition(steps[:, :n], labels, cache), ref)
    finally:
        official.set_kv_cache(False)


#: a tiny variant per release with its token bits and patch size, so the release's own
#: tokens_allocation applies
SAMPLING_VARIANT = {"B": "K16", "B-patch2": "K16-p2", "B-patch4": "K16-p4", "L": "K16",
                    "L-res512": "K10"}


@pytest.mark.parametrize("size", list(SAMPLING_VARIANT))
def test_released_sampling_settings_reproduce_official_generate(size):
    """`sample(**BAR_SAMPLING[size])` = official generate(guidance_scale, randomize_temperature,
    tokens_allocation) token for token under one global seed (both draw the same uniforms for
    the Gumbel noise of the bits and of the confidences, in the same order)."""
    cfg = _tiny_cfg(*VARIANTS[SAMPLING_VARIANT[size]])
    official = _official_of(cfg, seed=3)
    model = load_official(_released(official), cfg)
    labels = torch.tensor([2, 9])
    kw = BAR_SAMPLING[size]
    torch.manual_seed(5)
    ref_bits = official.generate(labels, guidance_scale=kw["guidance_scale"],
                                 randomize_temperature=kw["temperature"],
                                 tokens_allocation=kw["tokens_allocation"])
    torch.manual_seed(5)
    ours = sample(model, labels, **kw)
    ref = bits_to_indices(ref_bits.view(2, cfg.seq_len, cfg.token_bits))
    assert torch.equal(ours, ref)
    assert torch.equal(indices_to_bits(ours, cfg.token_bits).long().reshape(2, -1), ref_bits)


def test_spec_sampling_is_the_readme_eval_settings():
    # README "Generate and Evaluate": model.generator.guidance_scale,
    # mbm_head.randomize_temperature, mbm_head.tokens_allocation per release
    readme = {"bar_b": (5.0, 2.5, (2, 2, 5, 7)), "bar_b_patch2": (5.5, 2.0, (16, 16, 16, 16)),
              "bar_b_patch4": (9.6, 1.4, (64, 64, 64, 64)), "bar_l": (5.3, 3.0, (2, 2, 5, 7)),
              "bar_l_res512": (4.2, 2.8, (2, 2, 2, 4))}
    spec = families.get("bar")
    assert set(spec.sampling) == {BAR_RELEASES[r] for r in readme}
    for release, (g, t, alloc) in readme.items():
        size = BAR_RELEASES[release]
        assert spec.sampling[size] == {"guidance_scale": g, "temperature": t,
                                       "tokens_allocation": alloc}
        assert sum(alloc) == BAR_SIZES[size].step_bits


# --------------------------------------------------------------------------------------------------
# (c) bad input names the key
# --------------------------------------------------------------------------------------------------


def test_another_familys_release_is_refused_naming_its_key():
    rar = {"cls_token": torch.zeros(1, 1, 64), "lm_head.weight": torch.zeros(256, 64),
           "blocks.0.mlp.fc1.weight": torch.zeros(256, 64)}  # a released RAR generator's start
    with pytest.raises(ValueError, match="'lm_head.weight' is not a key of a released BAR"):
        load_official(rar, TINY)
    with pytest.raises(ValueError, match="lm_head.weight"):
        official_key_map(rar)


def test_a_vgen_export_is_not_a_release(released):
    vgen_state = load_official(released, TINY).state_dict()
    with pytest.raises(ValueError, match="freqs_cos|'pos_embed' has 69 rows.*vgen export"):
        official_key_map(vgen_state)
    with_rope = dict(vgen_state, **{k: v for k, v in released.items() if ".rope." in k})
    with pytest.raises(ValueError, match="'pos_embed' has 69 rows.*vgen export"):
        official_key_map(with_rope)


@pytest.mark.parametrize("key", ["blocks.1.attn.k_norm.weight", "blocks.0.adaLN_modulation.1.bias",
                                 "lm_head.t_embedder.W", "lm_head.transformer.1.mlp.w3.bias",
                                 "timesteps_embeddings", "norm.weight"])
def test_a_missing_key_is_named(released, key):
    state = {k: v for k, v in released.items() if k != key}
    with pytest.raises(ValueError, match=f"no '{re.escape(key)}'"):
        load_official(state, TINY)


def test_a_wrong_shape_is_named_with_the_expected_one(released):
    state = dict(released, **{"blocks.0.mlp.w3.weight": torch.zeros(64, 128)})
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.w3.weight' has shape \(64, 128\).*"
                                         r"expects \(64, 170\)"):
        load_official(state, TINY)
    # a release of another grid (K 8, 4 x 4): the first table, with both released shapes
    small = _released(_official_of(_tiny_cfg(8, 16)))
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 144, 64\).*"
                                         r"expects \(1, 192, 64\)"):
        load_official(small, TINY)
    # a patch-2 release into a patch-1 config: bits per step differ
    p2 = _released(_official_of(_tiny_cfg(8, 64, 2)))
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 144, 64\)"):
        load_official(p2, TINY)
    # ... and into a config with as many steps (16 tokens of 16 bits): the per-bit embedding
    with pytest.raises(ValueError, match=r"'input_embeddings.weight' has shape \(3, 2\).*"
                                         r"expects \(3, 4\)"):
        load_official(p2, _tiny_cfg(16, 16))
    # inconsistent tables: not a release
    state = dict(released, pos_embed=released["pos_embed"][:, :100])
    with pytest.raises(ValueError, match="'pos_embed' has 100 rows"):
        load_official(state, TINY)
    # an extra block (depth 3 checkpoint into depth 2)
    state = dict(released, **{"blocks.2.norm1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="'blocks.2.norm1.weight' has no place"):
        load_official(state, TINY)


def test_rope_buffers_and_prefix_are_checked(released):
    key = "blocks.1.attn.rope.freqs_sin"
    state = dict(released, **{key: released[key] * 1.01})
    with pytest.raises(ValueError, match=f"'{re.escape(key)}' differs from the RoPE table"):
        load_official(state, TINY)
    with pytest.raises(ValueError, match="repeat_class=8"):  # release R 4, config R 8
        load_official(released, bar_config("tiny", repeat_class=8))
    with pytest.raises(ValueError, match="rope=True"):
        load_official(released, bar_config("tiny", rope=False))
    state = {k: v for k, v in released.items() if ".rope." not in k}
    with pytest.raises(ValueError, match="no 'blocks.<i>.attn.rope.freqs_cos'"):
        load_official(state, TINY)


# --------------------------------------------------------------------------------------------------
# (d) vgen weights convert of a released .bin
# --------------------------------------------------------------------------------------------------


def test_weights_convert_of_a_released_bin(tmp_path, released, capsys):
    from pipelines.cli import main
    from vgen_core.tokenizers.io import load_pretrained

    path = tmp_path / "bar_tiny.bin"
    torch.save(released, path)  # the releases are .bin pickles (read weights-only)
    assert main(["weights", "convert", "--family", "bar", "--size", "tiny", "--json", str(path),
                 str(tmp_path / "bar")]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["names"] == "released" and manifest["family"] == "bar"
    dropped = manifest["dropped"]
    rope = sorted(k for k in released if ".rope." in k)
    assert sorted(dropped) == sorted([*rope, *(k for k in OFFICIAL_DROPPED if "[" in k)])
    model = load_pretrained(tmp_path / "bar")
    P, T = 1 + TINY.repeat_class, TINY.steps
    assert torch.equal(model.state_dict()["target_aware_pos_embed"],
                       released["target_aware_pos_embed"][:, P : P + T])
    with torch.no_grad():
        bits = torch.randint(0, 2, (2, T, TINY.step_bits))
        torch.testing.assert_close(model(bits, torch.tensor([0, 1])),
                                   load_official(released, TINY)(bits, torch.tensor([0, 1])))


# --------------------------------------------------------------------------------------------------
# patch_size > 1 (BAR-B/2, B/4) trains and samples through the public token API
# --------------------------------------------------------------------------------------------------


def test_patch_size_trains_and_samples_on_token_indices():
    from vgen_core.generators.bar import bar_loss

    torch.manual_seed(0)
    model = _tiny_cfg(8, 64, 2).build()  # 8 x 8 tokens of 8 bits -> 16 steps of 32 bits
    assert (model.steps, model.step_bits, model.lm_head.token_bits) == (16, 32, 32)
    tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    loss, metrics = bar_loss(model, tokens, torch.tensor([0, 1, 2, 3]), 0,
                             generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=0.05)  # adaLN-Zero init: chance
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    out = sample(model, torch.tensor([1, 2]), guidance_scale=2.0, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 64) and int(out.max()) < 256
    with pytest.raises(ValueError, match="divisible by it"):
        BARConfig(token_bits=8, seq_len=36, hidden=64, heads=4, patch_size=4)
