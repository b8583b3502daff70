"""The int8/fp8 KV formats: quantize -> dequantize error within the closed-form bound of each code, and the
paged write/read round trip (slice and gather) against the values written."""

from __future__ import annotations

import pytest
import torch

from llmcli.errors import UserError
from llmcli.layers import kv_cache


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 40, 16, generator=g) * torch.logspace(-3, 2, 40)[None, None, :, None]
    x[0, 0, 5] = 0  # an all-zero row: a finite scale, zeros back
    return x


def test_int8_error_is_at_most_half_a_step():
    x = _rows()
    codes, scale = kv_cache.quantize(x, torch.int8)
    assert codes.dtype == torch.int8 and scale.dtype == kv_cache.SCALE_DTYPE and scale.shape == x.shape[:-1]
    back = kv_cache.dequantize(codes, scale, torch.float32)
    step = scale.float()[..., None]
    assert ((back - x).abs() <= step / 2 + 1e-6 * x.abs()).all()  # round to nearest of absmax/127 steps
    assert (codes.abs().amax(-1)[x.abs().amax(-1) > 0] == 127).all()  # each row's absmax uses the full range
    assert (back[0, 0, 5] == 0).all()


def test_fp8_error_is_e4m3_rounding():
    x = _rows(1)
    codes, scale = kv_cache.quantize(x, torch.uint8)  # e4m3 bytes
    back = kv_cache.dequantize(codes, scale, torch.float32)
    s = scale.float()[..., None]
    # e4m3: 3 mantissa bits, so a relative error of at most 2^-4; below 2^-6 (subnormals) an absolute 2^-10
    assert ((back - x).abs() <= x.abs() * 2**-4 + s * 2**-10 + 1e-6 * x.abs()).all()


@pytest.mark.parametrize("storage", [torch.int8, torch.uint8, torch.bfloat16])
def test_paged_write_then_read_slice_and_gather(storage):
    kvh, nb, bs, d = 3, 6, 4, 16
    cache = torch.zeros(2 * kvh, nb, bs, d, dtype=storage)
    scales = torch.zeros(2 * kvh, nb, bs, dtype=kv_cache.SCALE_DTYPE) if kv_cache.is_scaled(storage) else None
    x = _rows(2)[:, :, :8]  # [2, kvh, 8 tokens, d]
    slots = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15])  # blocks 2 and 3
    kv_cache.write(cache, scales, slots, x)
    if scales is None:
        want = x.to(storage).float()
    else:
        want = kv_cache.dequantize(*kv_cache.quantize(x, storage), torch.float32)
    got = kv_cache.read_slice(cache, scales, 8, 16, kvh, torch.float32)  # [2, 1, kvh, 8, d]
    torch.testing.assert_close(got[:, 0], want, rtol=0, atol=0)
    gathered = kv_cache.read_gather(cache, scales, torch.tensor([2, 3]), 1, kvh, torch.float32)
    torch.testing.assert_close(gathered[:, 0], want, rtol=0, atol=0)


def test_unknown_and_unsupported_names_are_user_errors():
    with pytest.raises(UserError, match="unknown --kv-dtype"):
        kv_cache.storage_dtype("int4", torch.float32, torch.device("cpu"))
    with pytest.raises(UserError, match="not supported on CPU"):
        kv_cache.storage_dtype("fp16", torch.float32, torch.device("cpu"))
    assert kv_cache.storage_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16
