"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`, what vLLM's gptq and Marlin kernels
take): writing symmetric INT4 in it, and reading it back into the engine's Int4Linear.

Layout per quantized Linear `X` with K inputs, N outputs, G = K / group groups:
  X.qweight  int32 [K / 8, N]  codes 0..15 packed along the INPUT dim: row r holds inputs 8r..8r+7, input 8r+i in
             bits [4i, 4i + 4) (the packing of llmcli.quant.compressed_tensors.pack_int32)
  X.qzeros   int32 [G, N / 8]  zero points packed along the OUTPUT dim, STORED MINUS ONE: the original GPTQ code
             kept zero - 1 and every v1 reader adds the 1 back, so symmetric INT4 (zero 8) is stored as 7
             (0x77777777). `checkpoint_format: gptq_v2` (GPTQModel's internal form) stores the zero itself.
  X.scales   [G, N] in the model's 16-bit dtype
  X.g_idx    int32 [K]  the group of each input; with desc_act false it is k // group
  w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]
Symmetric INT4 is w = (q - 8) * s, the grid GPTQ's reference quantizer picks: s = 2 * max|w| / 15 per group. It is
Int4Linear's math with zeros 8. Loading takes desc_act false INT4 (symmetric or not: the stored zeros are
integers) into Int4Linear exactly; act-order (a permuted g_idx) or 8-bit checkpoints load dequantized (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from llmcli.errors import UserError
from llmcli.quant.compressed_tensors import SCALE_FLOOR, ModuleParts, grid_codes, pack_int32, unpack_int32
from llmcli.quant.int4 import pack_int4

log = logging.getLogger(__name__)
METHOD = "gptq"
PARTS = {"qweight", "qzeros", "scales", "g_idx"}


def symmetric_grid(w: torch.Tensor, group: int, dtype16: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale in dtype16, zero 8) [out, in // group]: the symmetric INT4 grid, scale 2 * max|w| / 15."""
    rows, k = w.shape
    absmax = w.float().reshape(rows, k // group, group).abs().amax(-1)
    scale = (2 * absmax / 15).to(dtype16).float().clamp(min=SCALE_FLOOR).to(dtype16)
    return scale, torch.full(scale.shape, 8.0)


def quantize_parts(
    w: torch.Tensor, group: int, method: str, dtype16: torch.dtype, hessian: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One weight [out, in] -> {suffix: tensor} of a GPTQ module (symmetric INT4, desc_act false)."""
    out_f, in_f = w.shape
    scale, zero = symmetric_grid(w, group, dtype16)
    codes = grid_codes(w, scale, zero, group, hessian if method == "gptq" else None)
    stored_zero = torch.full((in_f // group, out_f), 7, dtype=torch.uint8)  # zero 8, stored minus one (v1)
    return {
        "qweight": pack_int32(codes.T, 4, dim=0),
        "qzeros": pack_int32(stored_zero, 4),
        "scales": scale.T.contiguous(),
        "g_idx": (torch.arange(in_f) // group).to(torch.int32),
    }


def quantization_config(group: int) -> dict:
    return {
        "quant_method": METHOD,
        "bits": 4,
        "group_size": group,
        "desc_act": False,
        "sym": True,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "checkpoint_format": "gptq",
    }


def handles(qc: dict | None) -> bool:
    return bool(qc) and qc.get("quant_method") == METHOD


def as_llmcli(qc: dict, tensors: Iterator[tuple[str, torch.Tensor]]) -> tuple[dict | None, Iterator]:
    """(the llmcli quantization_config the engine builds its modules from -- None: dense --, the checkpoint's
    tensors re-laid into that form)."""
    bits, group = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
    if bits not in (4, 8):
        raise UserError(f"llmcli loads 4- and 8-bit GPTQ checkpoints, not {bits}-bit")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(f"unknown GPTQ checkpoint_format {fmt!r}")
    offset = 0 if fmt == "gptq_v2" else 1
    exact = bits == 4 and group > 0 and not qc.get("desc_act", False)
    if not exact:
        log.warning("GPTQ %d-bit desc_act=%s: no llmcli kernel, weights load dequantized", bits, qc.get("desc_act"))

    def convert(prefix: str, parts: dict) -> list:
        qw, scales, g_idx = parts["qweight"], parts["scales"], parts["g_idx"].long()
        k, n = qw.shape[0] * (32 // bits), scales.shape[1]
        q = unpack_int32(qw, bits, k, dim=0).T  # [N, K]
        zeros = unpack_int32(parts["qzeros"], bits, n).float() + offset  # [G, N]
        if exact:
            if not torch.equal(g_idx, torch.arange(k) // group):
                raise UserError(f"{prefix}.g_idx is not k // group_size although desc_act is false")
            return [
                (f"{prefix}.qweight", pack_int4(q)),
                (f"{prefix}.scales", scales.T.half()),
                (f"{prefix}.zeros", zeros.T.half()),
            ]
        w = (q.float() - zeros[g_idx].T) * scales.float()[g_idx].T
        return [(f"{prefix}.weight", w)]

    spec = {"quant_method": "llmcli", "bits": 4, "group_size": group, "method": "rtn", "quantize_embeddings": False}
    return (spec if exact else None), ModuleParts(PARTS, PARTS, convert)(tensors)
