"""INT4 group-wise asymmetric quantization (round to nearest) and the on-disk packing.

Per group of `group_size` consecutive input columns of a row: w ~= (q - zero) * scale, q in [0, 15],
scale and zero float16 (zero is a float, so HQQ can move it off the integer grid).

On-disk layout (documented, row-major, kernel-independent):
  qweight uint8 [..., out, in // 2]   byte j of a row holds column 2j in its low nibble, 2j+1 in its high nibble
  scales  fp16  [..., out, in // group_size]
  zeros   fp16  [..., out, in // group_size]
Every tensor is indexed by output row first, so fused projections concatenate along dim 0. Kernels repack
this at load time (llmcli.quant.linear).
"""

from __future__ import annotations

import torch

# One group-size rule for the quantizer and `llm estimate` (it lives in torch-free estimate, so that stays light).
from llmcli.estimate import effective_group_size


def minmax_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wg [..., G, g] fp32 -> (scale, zero) [..., G] of the min/max affine grid on [0, 15]."""
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero = -lo / scale
    return scale, zero


def quantize_groups(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round(wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15)


def quantize_int4_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., in] -> (q uint8 [..., in] values 0..15, scales fp16 [..., G], zeros fp16 [..., G])."""
    *lead, k = w.shape
    g = effective_group_size(k, group_size)
    wg = w.float().reshape(*lead, k // g, g)
    scale, zero = minmax_params(wg)
    scale, zero = scale.half(), zero.half()
    q = quantize_groups(wg, scale.float(), zero.float())
    return q.reshape(*lead, k).to(torch.uint8), scale, zero


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q [..., in] (unpacked 0..15) -> w [..., in]."""
    *lead, k = q.shape
    n_groups = scales.shape[-1]
    qg = q.reshape(*lead, n_groups, k // n_groups).float()
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(*lead, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., in] values 0..15 -> uint8 [..., in // 2]; even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in // 2] -> uint8 [..., in] values 0..15."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
