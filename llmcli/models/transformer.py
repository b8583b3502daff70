"""ONE configurable decoder-only transformer for every family, driven by ModelConfig.

Module tree (state-dict names follow transformers' llama names, so checkpoints load by name; gpt2/gpt_neox/phi/
bloom/mpt/falcon checkpoints are renamed onto them as they are read, llmcli.formats.safetensors.LEGACY_LAYOUTS):
  model.embed_tokens                       nn.Embedding
  model.embed_positions                    nn.Embedding (learned absolute positions, gpt2 only)
  model.embed_layernorm                    LayerNorm (bloom only)
  model.layers[i].input_layernorm          RMSNorm or LayerNorm (norm_type)
  model.layers[i].self_attn                Attention: qkv_proj (fused q/k/v rows), o_proj, [q_norm, k_norm]
                                           (MLA models: llmcli.layers.mla.MLAttention)
  model.layers[i].post_attention_layernorm pre-MLP norm, or gemma2/3's post-attention norm (none: phi's shared norm)
  model.layers[i].pre_feedforward_layernorm / post_feedforward_layernorm   (sandwich norms, gemma2/3 only)
  model.layers[i].mlp                      MLP (llmcli.layers.mlp): gate_up_proj (fused [gate; up] rows), down_proj
                                           (ungated: FeedForward, up_proj and down_proj; MoE: llmcli.layers.moe.MoE)
  model.norm, lm_head                      (lm_head shares embed_tokens.weight when tied; phi's has a bias)
Every projection is a plain nn.Linear so a quantizer can swap it. Positions are rope (meta.rope), learned
(embed_positions) or ALiBi (a score bias per step, meta.bias, shared by every layer).
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.layers.attention import Attention, AttentionMetadata, alibi_bias
from llmcli.layers.mla import MLAttention
from llmcli.layers.mlp import MLP, FeedForward
from llmcli.layers.moe import MoE
from llmcli.layers.norm import make_norm
from llmcli.layers.rotary import RotaryEmbedding


def make_attention(config: ModelConfig, i: int) -> nn.Module:
    if config.is_mla:
        return MLAttention(config, i)
    return Attention(config, i)


def make_mlp(config: ModelConfig, i: int) -> nn.Module:
    if config.is_moe_layer(i):
        return MoE(config)
    return MLP(config) if config.gated_mlp else FeedForward(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        c = config
        self.input_layernorm = make_norm(c, c.hidden_size)
        self.self_attn = make_attention(c, i)
        if not c.shared_norm:
            self.post_attention_layernorm = make_norm(c, c.hidden_size)
        self.sandwich = c.sandwich_norm
        self.parallel = c.parallel_residual
        self.shared_norm = c.shared_norm
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = make_norm(c, c.hidden_size)
            self.post_feedforward_layernorm = make_norm(c, c.hidden_size)
        self.mlp = make_mlp(c, i)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.parallel:  # attention and MLP both read the layer's input (phi: through one norm)
            h = self.input_layernorm(x)
            return x + self.self_attn(h, meta) + self.mlp(h if self.shared_norm else self.post_attention_layernorm(x))
        x = x + self.self_attn(self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.position_embedding == "learned":
            self.model.embed_positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        if c.embedding_norm:
            self.model.embed_layernorm = make_norm(c, c.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.model.norm = make_norm(c, c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=c.lm_head_bias)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # rope tables and ALiBi slopes live outside the state dict; the model runner grows the tables (ensure)
        self.rotary = {}
        if c.position_embedding == "rope":
            rot = (c.rotary_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
            self.rotary["global"] = RotaryEmbedding(*rot, c.original_max_position_embeddings)
        if c.rope_local_theta:  # gemma3: sliding layers use their own base and no scaling
            self.rotary["local"] = RotaryEmbedding(c.rotary_dim, c.rope_local_theta, None, c.max_position_embeddings)
        self.alibi = None
        if c.position_embedding == "alibi":
            with torch.device("cpu"):  # the model may be built under a meta-device context
                self.alibi = torch.tensor(c.alibi_slopes(), dtype=torch.float32)

    def ensure_positions(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        for r in self.rotary.values():
            r.ensure(n, device, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [B, Q] -> final hidden states [B, Q, hidden] (call compute_logits on the rows you need)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        if self.config.position_embedding == "learned":
            x = x + self.model.embed_positions(meta.positions)
        if self.config.embedding_norm:
            x = self.model.embed_layernorm(x)
        for key, rot in self.rotary.items():
            meta.rope[key] = rot(meta.positions, meta.pos_start)
        if self.alibi is not None:
            if self.alibi.device != x.device:  # moved once, not copied every step
                self.alibi = self.alibi.to(x.device)
            meta.bias = {w: alibi_bias(self.alibi, view, meta.positions, x.dtype) for w, view in meta.views.items()}
        for layer in self.model.layers:
            x = layer(x, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
