"""INT8 weight-only quantization: symmetric, one scale per output row.

w ~= q * scale with q in [-127, 127] (-128 unused so the grid is symmetric around 0). Rows are the
output channels, so fused q/k/v or gate/up rows and stacked experts ([E, out, in] viewed as E*out rows)
quantize independently and their tensors concatenate along dim 0.
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] -> (q int8 [..., in], scales fp16 [...])."""
    wf = w.float()
    # fp16 scales: the value stored is the value used, so quantize against the rounded scale
    scales = (wf.abs().amax(dim=-1) / 127.0).clamp(min=1e-8).to(torch.float16)
    q = torch.round(wf / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.float().unsqueeze(-1)).to(dtype)
