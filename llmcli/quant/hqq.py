"""HQQ: calibration-free half-quadratic optimisation of the INT4 zero point (Badri & Shaji, 2023).

The scale stays the min/max one; the zero point is refined to minimise an lp-norm (p < 1) of the
reconstruction error, which tolerates the few outlier weights a least-squares fit would chase.
Half-quadratic splitting adds an auxiliary error variable E ~= W - dequant(Q) and alternates:
  E <- shrink_p(W - dequant(Q), beta)         (generalised soft-thresholding, the lp proximal step)
  z <- mean over the group of (Q - (W - E) / s) (closed-form least squares for z given E)
  Q <- round(W / s + z) clamped to [0, 15]
with beta growing by kappa each step, stopping when the mean absolute error stops improving.
"""

from __future__ import annotations

import torch

from llmcli.quant.int4 import effective_group_size, minmax_params, quantize_groups


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p / beta (p < 1), the usual generalised soft-threshold approximation."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - (1.0 / beta) * ax.clamp(min=1e-12).pow(p - 1.0))


def optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, p: float = 0.7,
                  beta: float = 10.0, kappa: float = 1.01, iters: int = 20) -> torch.Tensor:
    """wg [..., G, g] fp32, scale/zero [..., G] -> the refined zero [..., G]."""
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    best_z = z
    best_err = torch.full_like(z, float("inf"))
    for i in range(iters + 1):
        q = torch.round(wg / s + z).clamp(0, 15)
        err_w = wg - (q - z) * s
        # keep the best zero per group (the reference stops globally per tensor; per group is never worse)
        err = err_w.abs().mean(dim=-1, keepdim=True)
        better = err < best_err
        if i > 0 and not bool(better.any()):  # no group improved: the reference's early stop
            break
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
        if i == iters:
            break
        e = shrink_lp(err_w, beta, p)
        z = (q - (wg - e) / s).mean(dim=-1, keepdim=True)
        beta *= kappa
    return best_z.squeeze(-1)


def quantize_int4_hqq(w: torch.Tensor, group_size: int, rows_per_chunk: int = 4096,
                      **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as quantize_int4_rtn: (q uint8 [..., in], scales fp16 [..., G], zeros fp16 [..., G])."""
    *lead, k = w.shape
    g = effective_group_size(k, group_size)
    rows = w.reshape(-1, k)
    qs, ss, zs = [], [], []
    for r0 in range(0, rows.shape[0], rows_per_chunk):  # bounded temporaries for huge layers
        wg = rows[r0:r0 + rows_per_chunk].float().reshape(-1, k // g, g)
        scale, zero = minmax_params(wg)
        scale = scale.half().float()
        zero = optimize_zero(wg, scale, zero, **kw).half().float()
        qs.append(quantize_groups(wg, scale, zero).reshape(-1, k).to(torch.uint8))
        ss.append(scale.half())
        zs.append(zero.half())
    n_groups = k // g
    return (torch.cat(qs).reshape(*lead, k), torch.cat(ss).reshape(*lead, n_groups),
            torch.cat(zs).reshape(*lead, n_groups))
