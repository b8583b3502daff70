"""RMSNorm (with gemma's (1 + w) offset) and LayerNorm, both computed in fp32 like the reference models."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset  # gemma stores w - 1 and multiplies by (1 + w)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.offset == 0.0:
            # fp32 fast path: the fused kernel is one op instead of five.
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # gemma multiplies in fp32 and casts last
            return (xf * (self.offset + self.weight.float())).to(dtype)
        # llama casts back before multiplying by the weight
        return self.weight * xf.to(dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm (gpt2, gpt_neox, phi, bloom; mpt's has no bias), computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return torch.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(config, dim: int) -> nn.Module:
    """The family's norm over `dim` features: RMSNorm (with gemma's offset) or LayerNorm."""
    if config.norm_type == "layer":
        return LayerNorm(dim, config.norm_eps, config.norm_bias)
    return RMSNorm(dim, config.norm_eps, config.norm_offset)
