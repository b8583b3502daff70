"""The KV cache's storage format (--kv-dtype): which dtype a layer's paged cache holds, and how keys/values are
written into it and read back for attention when that dtype is not the compute dtype.

Formats:
  auto            the compute dtype: attention writes and slices the cache directly (its own fast path).
  bf16/fp16/fp32  a float cache of another width: values are cast on write and on read.
  int8, fp8       8-bit codes (int8, or float8 e4m3) with one float16 scale per token and (K or V, KV head),
                  absmax / 127 (int8) or absmax / 448 (e4m3's largest finite value); 16-bit scales keep the
                  cache at 66 bytes per 64-value head row against 16-bit's 128 (a float32 scale would cost 3%
                  more for nothing: its rounding, 2^-11 relative, is far below int8's step). Quantized on write into the
                  paged cache; each layer dequantizes only the slots it reads, one layer at a time, so no
                  full-precision copy of the whole context (every layer) exists at any point.
Scales live in a second tensor shaped like the cache without its last dimension: [2 * kvh, blocks, block_size].
"""

from __future__ import annotations

import torch

from llmcli.config import KV_DTYPE_NAMES
from llmcli.errors import UserError

FLOAT_KV = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# e4m3 codes are kept as their bytes (uint8): CPU index_copy_/index_select have no float8 kernels
CODES = {torch.int8: torch.int8, torch.uint8: torch.float8_e4m3fn}
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-24  # float16's smallest subnormal: an all-zero row keeps a finite, nonzero scale


def storage_dtype(name: str | None, compute: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the cache tensors hold for --kv-dtype `name` (None or auto: the compute dtype)."""
    if name in (None, "auto"):
        return compute
    if name in FLOAT_KV:
        if name == "fp16" and device.type == "cpu":
            raise UserError("--kv-dtype fp16 is not supported on CPU; use bf16, fp32 or int8")
        return FLOAT_KV[name]
    if name == "int8":
        return torch.int8
    if name == "fp8":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise UserError("--kv-dtype fp8 needs a GPU with float8 support (compute capability 8.9+); use int8")
        return torch.uint8
    raise UserError(f"unknown --kv-dtype {name!r} (use {', '.join(KV_DTYPE_NAMES)})")


def is_scaled(dtype: torch.dtype) -> bool:
    """Whether a cache of this storage dtype holds 8-bit codes with scales (int8, fp8's bytes)."""
    return dtype in CODES


def quantize(x: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (codes [..., d] as the storage dtype, float16 scales [...]), one scale per row (a token's
    head). Codes are computed with the scale as stored, so dequantizing is exact up to the codes' rounding; the
    stored scale is at most 2^-11 below absmax / qmax, so int8 codes round to at most 127 without a clamp."""
    code = CODES[storage]
    xf = x.float()
    amax = torch.linalg.vector_norm(xf, float("inf"), dim=-1)  # max |x| in one kernel
    scale = amax.mul_(1 / QMAX[code]).clamp_min_(MIN_SCALE).to(SCALE_DTYPE)
    y = xf / scale.float()[..., None]
    if code == torch.int8:
        y = y.round_()
    return y.to(code).view(storage), scale


def write(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Store kv [2, kvh, n, d] (compute dtype) at cache slots `slots` [n], converting to the cache's format."""
    g, nb, bs, d = cache.shape
    kvh = kv.shape[1]
    pool = cache.view(2, kvh, nb * bs, d)
    if scales is None:
        pool.index_copy_(2, slots, kv.to(cache.dtype))
        return
    codes, s = quantize(kv, cache.dtype)
    pool.index_copy_(2, slots, codes)
    scales.view(2, kvh, nb * bs).index_copy_(2, slots, s)


def dequantize(codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache values (codes [..., d], scales [...]) back in the compute dtype."""
    if scales is None:
        return codes.to(dtype)
    if codes.dtype == torch.int8:  # int8 * float promotes inside the multiply: one pass, no float copy first
        return torch.mul(codes, scales.to(dtype)[..., None])
    return codes.view(CODES[codes.dtype]).to(dtype) * scales.to(dtype)[..., None]


def read_slice(
    cache: torch.Tensor, scales: torch.Tensor | None, lo: int, hi: int, kvh: int, dtype: torch.dtype
) -> torch.Tensor:
    """Slots [lo, hi) of the pool as [2, 1, kvh, K, d] in the compute dtype (batch 1, consecutive blocks)."""
    g, nb, bs, d = cache.shape
    codes = cache.view(2, kvh, nb * bs, d)[:, None, :, lo:hi]
    s = None if scales is None else scales.view(2, kvh, nb * bs)[:, None, :, lo:hi]
    return dequantize(codes, s, dtype)


def read_gather(
    cache: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor, b: int, kvh: int, dtype: torch.dtype
) -> torch.Tensor:
    """The blocks idx [B * n] of the pool as [2, B, kvh, n * block_size, d] in the compute dtype."""
    g, nb, bs, d = cache.shape
    codes = torch.index_select(cache.view(2, kvh, nb, bs, d), 2, idx)
    s = None if scales is None else torch.index_select(scales.view(2, kvh, nb, bs), 2, idx)
    return dequantize(codes, s, dtype).view(2, kvh, b, -1, d).transpose(1, 2)
