"""Rotary position embeddings: inverse frequencies for every rope variant, and cos/sin tables indexed by position.

inv_freq follows the formulas of the reference implementations (default, linear, llama3, yarn, longrope,
dynamic at its base length). Tables are built once (and grown when a longer position shows up), so a step only
gathers rows by position instead of recomputing sin/cos.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(
    theta: float, dim: int, scaling: dict | None, max_position: int, original_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(inv_freq, long inv_freq or None, attention factor) for a rotary dimension `dim`.

    The second tensor is only set for longrope: positions at or past original_max_position_embeddings use it.
    """
    inv = _base_inv_freq(theta, dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind in ("default", None):
        return inv, None, 1.0
    s = scaling
    if kind == "linear":
        return inv / s["factor"], None, 1.0
    if kind == "dynamic":
        # Dynamic NTK only changes the base past max_position_embeddings; at or below it this is the default.
        return inv, None, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv, s), None, 1.0
    if kind not in ("yarn", "longrope"):
        raise ValueError(f"unsupported rope type {kind!r}")
    orig = s.get("original_max_position_embeddings") or original_max or max_position
    factor = s.get("factor") or max_position / orig
    if kind == "yarn":
        return _yarn_inv_freq(inv, s, theta, dim, orig, factor)
    return _longrope_inv_freq(s, theta, dim, orig, factor)


def _llama3_inv_freq(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, smoothed, out)


def _yarn_inv_freq(
    inv: torch.Tensor, s: dict, theta: float, dim: int, orig: int, factor: float
) -> tuple[torch.Tensor, None, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    return (inv / factor) * (1 - extrap) + inv * extrap, None, float(attn)


def _longrope_inv_freq(
    s: dict, theta: float, dim: int, orig: int, factor: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * theta**shape)
    long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * theta**shape)
    return short, long, float(attn)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, n); `forward(positions)` gathers rows for a step.

    sin is stored with the sign of rotate_half folded in ([-sin | sin]), so applying rope is
    x * cos + roll(x, d/2) * sin: three kernels instead of slicing, negating and concatenating.
    """

    def __init__(
        self, dim: int, theta: float, scaling: dict | None, max_position: int, original_max: int | None = None
    ):
        super().__init__()
        self.dim = dim
        with torch.device("cpu"):  # the model may be built under a meta-device context
            inv, inv_long, self.attn_factor = rope_inv_freq(theta, dim, scaling, max_position, original_max)
        self.switch = None
        if inv_long is not None:
            self.switch = (scaling or {}).get("original_max_position_embeddings") or original_max or max_position
        self.inv_freq, self.inv_freq_long = inv, inv_long
        self.cos = self.sin = None
        self.length = 0

    def _table(self, inv: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attn_factor, emb.sin() * self.attn_factor
        half = self.dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos, sin

    def ensure(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        """Make the tables cover positions [0, n) (grown by doubling, built in fp32 then cast)."""
        if n <= self.length and self.cos is not None and self.cos.device == device:
            return
        length = max(n, 2 * self.length, 256)
        pos = torch.arange(length, dtype=torch.float32, device="cpu")
        cos, sin = self._table(self.inv_freq, pos)
        if self.inv_freq_long is not None:  # longrope: positions past the original context use long factors
            lc, ls = self._table(self.inv_freq_long, pos)
            far = (pos >= self.switch)[:, None]
            cos, sin = torch.where(far, lc, cos), torch.where(far, ls, sin)
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)
        self.length = length

    def forward(self, positions: torch.Tensor, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, Q] -> cos, sin [B, Q, 1, dim] (broadcast over heads).

        With `start` (one sequence, consecutive positions) the rows are a slice: no gather kernel.
        """
        if start is not None:
            q = positions.shape[1]
            return self.cos[start : start + q, None].unsqueeze(0), self.sin[start : start + q, None].unsqueeze(0)
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x [..., heads, head_dim] (partial rotary keeps the rest)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(d // 2, -1), sin)
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(d // 2, -1), sin), rest), dim=-1)
