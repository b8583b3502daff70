"""The dense MLPs: gated (down_proj(act(gate) * up), gate and up fused into one projection's rows) and plain
(down_proj(act(up x)): gpt2, gpt_neox, phi, bloom, mpt)."""

from __future__ import annotations

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.layers.activation import activation, gated


class MLP(nn.Module):
    """gate_up_proj [2I, H] (rows: [gate; up]) and down_proj [H, I]; a plain nn.Linear each, so a quantizer can
    swap them. intermediate_size overrides the config's (MoE shared experts have their own width)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        i = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.act, self.gate_up_proj(x)))


class FeedForward(nn.Module):
    """The ungated MLP: up_proj [I, H] then down_proj [H, I], a plain nn.Linear each."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
