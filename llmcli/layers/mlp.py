"""The dense gated MLP: down_proj(act(gate) * up) with gate and up fused into one projection's rows."""

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
