"""ONE configurable decoder-only transformer for every family, driven by ModelConfig.

Module tree (state-dict names follow transformers' so checkpoints load by name):
  model.embed_tokens                       nn.Embedding
  model.layers[i].input_layernorm          RMSNorm
  model.layers[i].self_attn                Attention: qkv_proj (fused q/k/v rows), o_proj, [q_norm, k_norm]
                                           (MLA models: llmcli.layers.mla.MLAttention)
  model.layers[i].post_attention_layernorm RMSNorm (pre-MLP norm, or gemma2/3's post-attention norm)
  model.layers[i].pre_feedforward_layernorm / post_feedforward_layernorm   (sandwich norms, gemma2/3 only)
  model.layers[i].mlp                      MLP (llmcli.layers.mlp): gate_up_proj (fused [gate; up] rows), down_proj
                                           (MoE layers: llmcli.layers.moe.MoE)
  model.norm, lm_head                      (lm_head shares embed_tokens.weight when tied)
Every projection is a plain nn.Linear so a quantizer can swap it.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.layers.attention import Attention, AttentionMetadata
from llmcli.layers.mla import MLAttention
from llmcli.layers.mlp import MLP
from llmcli.layers.moe import MoE
from llmcli.layers.norm import RMSNorm
from llmcli.layers.rotary import RotaryEmbedding


def make_attention(config: ModelConfig, i: int) -> nn.Module:
    if config.is_mla:
        return MLAttention(config, i)
    return Attention(config, i)


def make_mlp(config: ModelConfig, i: int) -> nn.Module:
    if config.is_moe_layer(i):
        return MoE(config)
    return MLP(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        c = config

        def norm() -> RMSNorm:
            return RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)

        self.input_layernorm = norm()
        self.self_attn = make_attention(c, i)
        self.post_attention_layernorm = norm()
        self.sandwich = c.sandwich_norm
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = make_mlp(c, i)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if c.norm_type != "rms" or c.position_embedding != "rope" or not c.gated_mlp or c.parallel_residual:
            raise UserError(f"the {c.family} architecture is not supported by the inference engine yet")
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.norm_eps, c.norm_offset)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # rope tables live outside the state dict; the model runner grows them (ensure) before a step
        self.rotary = {
            "global": RotaryEmbedding(
                c.rotary_dim,
                c.rope_theta,
                c.rope_scaling,
                c.max_position_embeddings,
                c.original_max_position_embeddings,
            )
        }
        if c.rope_local_theta:  # gemma3: sliding layers use their own base and no scaling
            self.rotary["local"] = RotaryEmbedding(c.rotary_dim, c.rope_local_theta, None, c.max_position_embeddings)

    def ensure_positions(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        for r in self.rotary.values():
            r.ensure(n, device, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [B, Q] -> final hidden states [B, Q, hidden] (call compute_logits on the rows you need)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        for key, rot in self.rotary.items():
            meta.rope[key] = rot(meta.positions, meta.pos_start)
        for layer in self.model.layers:
            x = layer(x, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
