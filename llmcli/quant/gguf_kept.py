"""GGUF blocks -> our quantized modules' tensors, so a GGUF's Q4_0/Q4_1/Q8_0 weights load without dequantizing.

Q4_0/Q4_1 become Int4OffsetLinear tensors (int4, group 32, with offsets: exact); Q8_0 becomes Int8Linear
tensors (requantized per row). iter_gguf_kept is llmcli.formats.gguf_tensors.iter_gguf_tensors with the
named weights converted this way; the loader uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.formats.gguf_tensors import RawTensor, dense_tensor, dequantize_torch, iter_gguf_raw
from llmcli.quant.int4 import pack_int4
from llmcli.quant.int8 import quantize_int8

# The GGML types whose blocks map onto our kernels' layouts (llmcli.quant.linear): which module they load into.
KEEP_INT4 = ("Q4_0", "Q4_1")  # Int4OffsetLinear, group 32: exact
KEEP_INT8 = ("Q8_0",)  # Int8Linear, requantized per row (see requantize_q8_0 for why)
KEPT_GROUP_SIZE = 32
REQUANT_ROWS = 512  # rows of a Q8_0 tensor requantized at once (see requantize_q8_0)


def _nibbles_to_pairs(qs: torch.Tensor) -> torch.Tensor:
    """ggml's 16 bytes per block (element j low nibble, j + 16 high nibble) -> llmcli.quant.int4's packing
    (columns 2j, 2j + 1 in the low/high nibble of byte j)."""
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [..., 32] in element order
    return pack_int4(q)


def raw_to_int4(raw: RawTensor) -> dict[str, torch.Tensor]:
    """A Q4_0/Q4_1 RawTensor [out, in] -> Int4OffsetLinear tensors: qweight uint8 [out, in/2],
    scales and offsets fp16 [out, in/32], with w = q * scale + offset exactly as ggml dequantizes."""
    out, k = raw.shape
    n_groups = k // KEPT_GROUP_SIZE
    with warnings.catch_warnings():  # read-only memory map; nothing here writes to it
        warnings.simplefilter("ignore")
        b = torch.from_numpy(raw.data).reshape(out, n_groups, raw.type_size)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    if raw.ggml_type.name == "Q4_1":  # d, m, 16 bytes: w = d * q + m
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        qs = b[..., 4:]
    else:  # Q4_0: d, 16 bytes: w = d * (q - 8) = d * q + (-8 d); -8d is exact in fp16 unless it overflows
        m = (d.float() * -8.0).to(torch.float16)
        if not torch.isfinite(m).all():
            raise UserError(f"{raw.name}: Q4_0 scale too large to keep quantized (load with --dequantize)")
        qs = b[..., 2:]
    qweight = _nibbles_to_pairs(qs).reshape(out, k // 2)
    return {"qweight": qweight, "scales": d.clone(), "offsets": m.clone()}


def requantize_q8_0(raw: RawTensor) -> dict[str, torch.Tensor]:
    """A Q8_0 RawTensor [out, in] -> Int8Linear tensors (qweight int8 [out, in], scales fp16 [out]).

    Q8_0 has one scale per 32 values; the fast CPU kernel (aten._weight_int8pack_mm) takes one per row.
    Measured on this 2-core CPU at decode (one row, SmolLM2 shapes): the per-row kernel takes 25-47 us per
    projection, an exact block-scaled dequantize-then-matmul 150-440 us, slower even than the fp32 matmul
    it would replace (64-99 us). So the row is requantized: the extra error is at most half a row step
    (row max / 254) per weight, ~0.7% relative (Frobenius) on Gaussian weights, on top of Q8_0's own.

    Rows are independent (one scale each), so they go REQUANT_ROWS at a time: the float32 copy of a chunk stays in
    cache through the half-dozen passes, ~10x faster than over the whole tensor at once for a 49k-row embedding
    (it is on the `llm run` start-up path), with the same result bit for bit.
    """
    out, k = raw.shape
    q = torch.empty(out, k, dtype=torch.int8)
    scales = torch.empty(out, dtype=torch.float16)
    for lo in range(0, out, REQUANT_ROWS):
        rows = raw.data[lo : lo + REQUANT_ROWS]
        w = dequantize_torch(rows, raw.ggml_type, (rows.shape[0], k))
        q[lo : lo + REQUANT_ROWS], scales[lo : lo + REQUANT_ROWS] = quantize_int8(w)
    return {"qweight": q, "scales": scales}


def iter_gguf_kept(
    path: str | Path, dtype: torch.dtype | None = None, keep: dict[str, str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like iter_gguf_tensors, but the weights named in keep (HF name -> "int4" | "int8") come out as the
    quantized module's tensors instead: NAME.qweight / .scales / .offsets (raw_to_int4) or NAME.qweight /
    .scales (requantize_q8_0), NAME being the weight's name without `.weight`."""
    dtype = dtype or torch.float32
    keep = keep or {}
    for raw in iter_gguf_raw(path):
        kind = keep.get(raw.name)
        if kind is not None:
            base = raw.name.removesuffix(".weight")
            parts = raw_to_int4(raw) if kind == "int4" else requantize_q8_0(raw)
            for suffix, t in parts.items():
                yield f"{base}.{suffix}", t
            continue
        yield raw.name, dense_tensor(raw, path).to(dtype)
