"""DeepSeek multi-head latent attention (MLA) on the paged cache.

Keys and values of all heads are linear images of one small per-token latent c (kv_lora_rank values, after
kv_a_layernorm) plus one rope key shared by every head (qk_rope_head_dim values). The cache stores exactly
that, [c | k_rope] per token, instead of full per-head K and V: that is MLA's point.

Attention runs in the latent space ("absorbed" form). With kv_b_proj split per head into W_UK [dn, r] and
W_UV [dv, r]:
    score_h(t, s) = q_nope_h(t) . (W_UK_h c(s)) + q_rope_h(t) . k_rope(s)
                  = [W_UK_h^T q_nope_h(t) | q_rope_h(t)] . [c(s) | k_rope(s)]
    out_h(t)      = sum_s p_h(t, s) W_UV_h c(s) = W_UV_h (sum_s p_h(t, s) c(s))
so it is one-KV-head attention whose key is the cached row itself and whose value is its first r values;
nothing is up-projected per cached token, and each step reads kv_lora_rank + qk_rope_head_dim values per token.

Long query chunks (prefill) instead up-project the context to per-head K/V once ("expanded" form): per context
token that costs r * h * (dn + dv) multiply-adds but makes every (query, key) pair cost h * (dn + dr + dv)
instead of h * (2r + dr); it wins once the chunk has more than r (dn + dv) / (2r - dn - dv) queries
(170 for DeepSeek-V3's shapes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.layers.attention import AttentionMetadata
from llmcli.layers.norm import RMSNorm
from llmcli.layers.rotary import apply_rotary

# DeepSeek builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not config.rms_norm_eps.
_LORA_NORM_EPS = 1e-6


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek rotates adjacent pairs; after this permutation
    the usual rotate-half rope does the same rotation. Applied to q and k alike, so scores are unchanged."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """Modules under DeepSeek's checkpoint names: q_proj | (q_a_proj, q_a_layernorm, q_b_proj),
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.nope, self.rope = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.rank = c.v_head_dim, c.kv_lora_rank
        qk = self.nope + self.rope
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.qkv_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, c.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.rank + self.rope, bias=c.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, c.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(c.num_heads * self.v_dim, c.hidden_size, bias=c.o_bias)
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale  # includes yarn's mscale^2 when the checkpoint asks for it
        self.kv_cache: torch.Tensor | None = None  # [1, blocks, block_size, rank + rope], set by the model runner
        self._kv_b_dense: torch.Tensor | None = None  # dequantized kv_b_proj, when it is quantized
        gain = 2 * self.rank - self.nope - self.v_dim  # per-pair saving of the expanded form, per head
        self.expand_from = math.floor(self.rank * (self.nope + self.v_dim) / gain) + 1 if gain > 0 else 1 << 62

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as per-head W_UK [h, dn, r] and W_UV [h, dv, r]."""
        w = getattr(self.kv_b_proj, "weight", None)
        if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2):
            # A quantized kv_b_proj (llmcli.quant): the absorbed form needs the matrix itself, so dequantize it
            # once. It is small next to the experts (r x h (dn + dv) per layer).
            if self._kv_b_dense is None:
                dt = self.kv_a_layernorm.weight.dtype
                self._kv_b_dense = self.kv_b_proj.dequantize(dt).to(self.kv_a_layernorm.weight.device)
            w = self._kv_b_dense
        w = w.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, Q, H] -> (q_nope [B, Q, h, dn], q_rope [B, Q, h, dr] rotated, cache rows [B, Q, r + dr])."""
        b, ql, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, ql, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], -1)
        if self.interleaved:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, q_rope, torch.cat((self.kv_a_layernorm(latent), k_rope), dim=-1)

    def attend(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Absorbed attention over cache rows ctx [B, K, r + dr]; mask [B, 1, Q, K] (True = attend) or None."""
        b, ql = q_nope.shape[:2]
        h, kl = self.num_heads, ctx.shape[1]
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bqhd,hdr->bhqr", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # [B, h, Q, r + dr]
        # One KV "head" shared by all query heads: fold heads into the query rows, so scores and output are
        # one batched matmul each over the cache rows as stored (no per-head expansion, unlike SDPA's GQA).
        scores = torch.bmm(q.reshape(b, h * ql, -1), ctx.transpose(1, 2)).view(b, h, ql, kl).float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(ctx.dtype)
        out = torch.bmm(probs.view(b, h * ql, kl), ctx[..., : self.rank]).view(b, h, ql, self.rank)
        out = torch.einsum("bhqr,hvr->bqhv", out, w_uv).reshape(b, ql, h * self.v_dim)
        return self.o_proj(out)

    def attend_expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Same result as attend(), computed with per-head K/V up-projected from the cached latents."""
        b, ql = q_nope.shape[:2]
        kl, h = ctx.shape[1], self.num_heads
        kv = self.kv_b_proj(ctx[..., : self.rank]).view(b, kl, h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, ctx[..., self.rank :].unsqueeze(2).expand(b, kl, h, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale
        )  # [B, h, Q, dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, ql, h * self.v_dim))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b, ql, _ = x.shape
        cos, sin = meta.rope["global"]
        q_nope, q_rope, rows = self.project(x, cos, sin)
        cache = self.kv_cache[0]  # one group: [blocks, block_size, rank + rope]
        width = cache.shape[-1]
        cache.view(-1, width).index_copy_(0, meta.slot_mapping, rows.reshape(b * ql, width).to(cache.dtype))
        view = meta.views[None]  # MLA models have no sliding window
        ctx = cache[view.block_tables].view(b, -1, width)[:, view.start : view.end]
        if ql >= self.expand_from:
            return self.attend_expanded(q_nope, q_rope, ctx, view.mask)
        return self.attend(q_nope, q_rope, ctx, view.mask)
