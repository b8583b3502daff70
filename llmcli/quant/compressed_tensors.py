"""The compressed-tensors `pack-quantized` checkpoint format (what vLLM, SGLang and transformers load): writing
our INT4/INT8 weights in it, and reading it back into the engine's int4/int8 modules.

Layout per quantized Linear `X` (compressed-tensors 0.20, the reference package):
  X.weight_packed      int32 [out, ceil(in * bits / 32)]  codes + 2**(bits-1) (unsigned), 32 // bits per word along
                       the input dim, element i of a word in bits [i * bits, (i + 1) * bits)
  X.weight_scale       [out, in // group] (INT4 group) or [out, 1] (INT8 channel), the model's 16-bit dtype
  X.weight_zero_point  int32 [ceil(out / 8), in // group], INT4 asymmetric only: zero + 8, packed along the OUTPUT dim
  X.weight_shape       int64 [2] = (out, in)
  w = (q - zero_point) * scale with q, zero_point signed (q in [-8, 7] / [-128, 127]).
Our INT4 form w = (q' - z') * s with q' in [0, 15] is the same with q' = q + 8, z' = zero_point + 8, so a
checkpoint maps onto llmcli.quant.linear.Int4Linear exactly when z' is an integer in [0, 15]: the writer uses an
integer zero-point grid (ours otherwise keeps HQQ's fractional zeros). INT8 per-channel symmetric (q in
[-127, 127], one scale per row) is Int8Linear's math. Schemes the engine has no module for (INT8 asymmetric or
grouped, INT4 per channel) load dequantized to dense weights (logged once).

Scales are written in the model's 16-bit dtype (vLLM casts them to it; fp16 ones would be rounded in a bf16 model)
and quantized against that rounding; the engine keeps fp16 scales, exact for bf16 values in fp16's normal range,
which the writer guarantees with a floor of 2**-14 (a group whose range is under 15 * 2**-14 gets a coarser step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from llmcli.errors import UserError
from llmcli.quant.gptq import gptq_core
from llmcli.quant.hqq import column_importance, quantize_int4_hqq, weighted_sq_error
from llmcli.quant.int4 import pack_int4

log = logging.getLogger(__name__)
METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
SCALE_FLOOR = 2.0**-14  # the smallest normal fp16: a bf16 scale at or above it converts to fp16 exactly


# ---- packing (shared with the GPTQ format) ----------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned codes (< 2**bits) -> int32 words, 32 // bits per word along dim (zero-padded), code i of a word in
    bits [i * bits, (i + 1) * bits)."""
    per = 32 // bits
    v = codes.to(torch.int32).movedim(dim, -1)
    pad = (-v.shape[-1]) % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per)
    words = v[..., 0].clone()
    for i in range(1, per):  # int32 shifts wrap into the sign bit: the word's bits are exactly the codes'
        words |= v[..., i] << (i * bits)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> uint8 codes, n of them along dim."""
    per = 32 // bits
    w = words.movedim(dim, -1)
    v = torch.stack([(w >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], dim=-1)  # the mask drops sign bits
    v = v.reshape(*w.shape[:-1], -1)[..., :n]
    return v.to(torch.uint8).movedim(-1, dim).contiguous()


# ---- integer INT4 grids and their codes (shared with the GPTQ format) ---------------------------------------------
def grid_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, hessian: torch.Tensor | None
) -> torch.Tensor:
    """Codes 0..15 [out, in] for the fixed grid (scale, zero) [out, in // group]: nearest, or GPTQ's column
    order with error feedback when a Hessian is given (static groups: the grid does not move)."""
    s, z = scale.float(), zero.float()
    if hessian is None:
        rows, k = w.shape
        wg = w.float().reshape(rows, k // group, group)
        q = torch.round(wg / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, 15)
        return q.reshape(rows, k).to(torch.uint8)

    def col(j: int, wcol: torch.Tensor):
        sj, zj = s[:, j // group], z[:, j // group]
        q = torch.round(wcol / sj + zj).clamp(0, 15)
        return q, (q - zj) * sj

    return gptq_core(w, hessian, col).to(torch.uint8)


def int8_codes(w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Unsigned INT8 codes q + 128 [out, in] for symmetric per-row scales [out] (q in [-127, 127]): nearest, or
    GPTQ with error feedback when a Hessian is given."""
    if hessian is None:
        q = torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127)
    else:

        def col(j: int, wcol: torch.Tensor):
            q = torch.round(wcol / scale).clamp(-127, 127)
            return q, q * scale

        q = gptq_core(w, hessian, col)
    return (q + 128).to(torch.uint8)


def integer_zero_grid(
    w: torch.Tensor, group: int, method: str, dtype16: torch.dtype, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale in dtype16, integer zero 0..15 as float) [out, in // group] of an asymmetric INT4 grid: the min/max
    grid widened to hold 0 (so the zero point is on the grid). hqq: per group, HQQ's searched scale with its zero
    rounded to an integer where that has the lower importance-weighted error (llmcli.quant.hqq), else min/max."""
    rows, k = w.shape
    wg = w.float().reshape(rows, k // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).to(dtype16).float().clamp(min=SCALE_FLOOR)
    zero = torch.round(-lo / scale).clamp(0, 15)
    if method != "hqq":
        return scale.to(dtype16), zero
    _, s, z = quantize_int4_hqq(w, group, importance=importance)
    s, z = s.float().to(dtype16).float().clamp(min=SCALE_FLOOR), torch.round(z.float()).clamp(0, 15)
    weight = column_importance(w) * (1.0 if importance is None else importance.float())
    weight = weight.reshape(k // group, group)
    better = weighted_sq_error(wg, s, z, weight) < weighted_sq_error(wg, scale, zero, weight)
    return torch.where(better, s, scale).to(dtype16), torch.where(better, z, zero)


# ---- writing ----------------------------------------------------------------------------------------------------
def quantize_parts(
    w: torch.Tensor,
    bits: int,
    group: int,
    method: str,
    dtype16: torch.dtype,
    hessian: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One weight [out, in] -> {suffix: tensor} of a pack-quantized module."""
    out_f, in_f = w.shape
    shape = torch.tensor([out_f, in_f], dtype=torch.int64)
    if bits == 8:
        scale = (w.float().abs().amax(dim=1) / 127.0).to(dtype16).float().clamp(min=SCALE_FLOOR)
        codes = int8_codes(w, scale, hessian if method == "gptq" else None)
        return {
            "weight_packed": pack_int32(codes, 8),
            "weight_scale": scale.to(dtype16)[:, None],
            "weight_shape": shape,
        }
    scale, zero = integer_zero_grid(w, group, method, dtype16, importance)
    codes = grid_codes(w, scale, zero, group, hessian if method == "gptq" else None)
    return {
        "weight_packed": pack_int32(codes, 4),
        "weight_scale": scale,
        "weight_shape": shape,
        "weight_zero_point": pack_int32(zero.to(torch.uint8), 4, dim=0),
    }


def quantization_config(bits: int, group: int, ignore: list[str]) -> dict:
    """config.json's quantization_config: one config group for every Linear, `ignore` for what stays 16-bit."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": bits == 8,
        "group_size": None if bits == 8 else group,
        "strategy": "channel" if bits == 8 else "group",
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    scheme = {  # the group names its format too, as the package's own ModelCompressor writes it
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": FORMAT,
    }
    return {
        "quant_method": METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


# ---- reading ----------------------------------------------------------------------------------------------------
class ModuleParts:
    """Collects each module's stored parts (they may arrive in any order, across shards) and hands a module's
    complete set to convert(prefix, parts) -> [(name, tensor)]; other tensors pass through unchanged."""

    def __init__(self, suffixes: set[str], required: set[str], convert: Callable[[str, dict], list]):
        self.suffixes, self.required, self.convert = suffixes, required, convert

    def __call__(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors:
            prefix, _, suffix = name.rpartition(".")
            if suffix not in self.suffixes:
                yield name, t
                continue
            parts = pending.setdefault(prefix, {})
            parts[suffix] = t
            if self.required <= parts.keys():
                yield from self.convert(prefix, pending.pop(prefix))
        if pending:
            prefix, parts = next(iter(pending.items()))
            lacking = ", ".join(sorted(self.required - parts.keys()))
            raise UserError(f"the checkpoint's {prefix} lacks {lacking}")


def _weights_scheme(qc: dict) -> dict:
    groups = list((qc.get("config_groups") or {}).values())
    if qc.get("format") != FORMAT or len(groups) != 1:
        raise UserError(
            f"llmcli loads compressed-tensors checkpoints in the {FORMAT} format with one config group "
            f"(this one: format {qc.get('format')!r}, {len(groups)} groups)"
        )
    g = groups[0]
    w = g.get("weights") or {}
    if g.get("input_activations") or w.get("type") != "int" or w.get("num_bits") not in (4, 8):
        raise UserError("llmcli loads compressed-tensors INT4/INT8 weight-only checkpoints (W4A16, W8A16)")
    if w.get("actorder") not in (None, "static", "weight"):  # group actorder permutes columns: not stored here
        raise UserError(f"compressed-tensors actorder {w['actorder']!r} is not supported")
    return w


def handles(qc: dict | None) -> bool:
    return bool(qc) and qc.get("quant_method") == METHOD


def as_llmcli(qc: dict, tensors: Iterator[tuple[str, torch.Tensor]]) -> tuple[dict | None, Iterator]:
    """(the llmcli quantization_config the engine builds its modules from -- None: dense --, the checkpoint's
    tensors renamed and re-laid into that form)."""
    w = _weights_scheme(qc)
    bits, sym, strategy = int(w["num_bits"]), bool(w.get("symmetric", True)), w.get("strategy")
    group = int(w["group_size"]) if strategy == "group" else None
    exact = (bits == 8 and sym and strategy == "channel") or (bits == 4 and strategy == "group")
    if not exact:
        log.warning("compressed-tensors %d-bit %s scheme: no llmcli kernel, weights load dequantized", bits, strategy)
    required = {"weight_packed", "weight_scale", "weight_shape"} | (set() if sym else {"weight_zero_point"})

    def convert(prefix: str, parts: dict) -> list:
        out_f, in_f = (int(x) for x in parts["weight_shape"].tolist())
        q = unpack_int32(parts["weight_packed"], bits, in_f)
        scale = parts["weight_scale"]
        half = 1 << (bits - 1)
        zp = (
            unpack_int32(parts["weight_zero_point"], bits, out_f, dim=0).float()
            if "weight_zero_point" in parts
            else torch.full(scale.shape, float(half))
        )
        if not exact:
            reps = in_f // scale.shape[-1]
            wq = (q.float() - zp.repeat_interleave(reps, -1)) * scale.float().repeat_interleave(reps, -1)
            return [(f"{prefix}.weight", wq)]
        if bits == 8:
            return [
                (f"{prefix}.qweight", (q.to(torch.int16) - 128).to(torch.int8)),
                (f"{prefix}.scales", scale.half().flatten()),
            ]
        return [(f"{prefix}.qweight", pack_int4(q)), (f"{prefix}.scales", scale.half()), (f"{prefix}.zeros", zp.half())]

    suffixes = {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    spec = {"quant_method": "llmcli", "bits": bits, "method": "rtn", "quantize_embeddings": False}
    if bits == 4:
        spec["group_size"] = group
    return (spec if exact else None), ModuleParts(suffixes, required, convert)(tensors)
