"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs X.

The Hessians come from llmcli.tools.calibration.collect_hessians (the unquantized model run on calibration text).

gptq_core is the algorithm for any fixed grid: damping (a fraction of the mean diagonal), upper Cholesky
factor of H^-1, lazy block updates of 128 columns, and act-order (columns with the largest Hessian diagonal,
i.e. the most energetic inputs, go first, while there are still many columns left to absorb their error).
The grid is fixed before the loop ("static groups"): INT4 groups take HQQ's scale and zero computed from the
original weights, INT8 rows their absmax scale, NF4 blocks their searched scale. That is what makes act-order
compatible with groups: a group's parameters no longer depend on which of its columns were quantized first.
The column loop is inherent to the algorithm (each column depends on the error of the previous ones);
everything inside it is a whole-row tensor op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmcli.estimate import effective_group_size
from llmcli.quant.hqq import quantize_int4_hqq

BLOCK = 128
DAMP = 0.01

# (column index in the original order, column values [rows]) -> (stored value [rows], dequantized [rows])
ColumnQuantizer = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def gptq_core(
    w: torch.Tensor, hessian: torch.Tensor, quantize_col: ColumnQuantizer, *, act_order: bool = True, damp: float = DAMP
) -> torch.Tensor:
    """w [rows, cols], H [cols, cols] -> the stored values [rows, cols] (fp32, original column order)."""
    W = w.float().clone()
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, quantize zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    order = perm.tolist()
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q, deq = quantize_col(order[i1 + i], W1[:, i])
            Q[:, i1 + i] = q
            err = (W1[:, i] - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, *, act_order: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [rows, cols], H [cols, cols] -> int8: (q int8, scales fp16 [rows], None);
    int4: (q uint8 0..15 [rows, cols], scales fp16 [rows, G], zeros fp16 [rows, G])."""
    W = w.float()
    rows, cols = W.shape
    if bits == 8:
        scale8 = (W.abs().amax(dim=1) / 127.0).clamp(min=1e-8).half().float()

        def col8(j: int, wcol: torch.Tensor):
            q = torch.round(wcol / scale8).clamp(-127, 127)
            return q, q * scale8

        return gptq_core(W, hessian, col8, act_order=act_order).to(torch.int8), scale8.half(), None
    g = effective_group_size(cols, group_size or 128)
    _, scales, zeros = quantize_int4_hqq(W, g)  # the static grid: HQQ's calibration-free optimum
    s, z = scales.float(), zeros.float()

    def col4(j: int, wcol: torch.Tensor):
        sj, zj = s[:, j // g], z[:, j // g]
        q = torch.round(wcol / sj + zj).clamp(0, 15)
        return q, (q - zj) * sj

    return gptq_core(W, hessian, col4, act_order=act_order).to(torch.uint8), scales, zeros


def gptq_quantize_grid(
    w: torch.Tensor,
    hessian: torch.Tensor,
    block_scales: torch.Tensor,
    code: torch.Tensor,
    block: int,
    *,
    act_order: bool = True,
) -> torch.Tensor:
    """A scaled codebook grid (NF4): w[r, j] ~= code[idx] * block_scales[r, j // block], code ascending.
    Returns idx [rows, cols] (long)."""
    mids = (code[1:] + code[:-1]) / 2
    s = block_scales.float().clamp(min=1e-12)

    def colc(j: int, wcol: torch.Tensor):
        sj = s[:, j // block]
        idx = torch.bucketize(wcol / sj, mids)
        return idx.float(), code[idx] * sj

    return gptq_core(w, hessian, colc, act_order=act_order).long()
