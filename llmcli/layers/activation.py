"""Activations by config name, and the gated form applied to a fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("gelu", "gelu_exact"):
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


def gated(act, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
