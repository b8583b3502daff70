"""Quantized drop-in replacements for nn.Linear and the kernels they run.

Parameters hold the plain on-disk layout (see int8.py / int4.py) so the loader copies checkpoint tensors
into them by name, fusing q/k/v and gate/up rows first. The kernel layout is built lazily on the first
forward (or by llmcli.quant.prepare.finalize), i.e. after fusing, on whatever device the weights ended up on:

  CPU  int8: aten._weight_int8pack_mm (bf16 activations; only when in_features % 16 == 0, because in
             torch 2.13 other sizes return garbage or crash), else dequantize-on-the-fly.
  CPU  int4: aten._weight_int4pack_mm_for_cpu (bf16 activations, tinygemm [G, N, 2] scale/offset table).
  CUDA int4: aten._weight_int4pack_mm (bf16, sm80+) for decode; prefill dequantizes to a dense matmul.
  CUDA int8: dense matmul on the int8 weight cast to the activation dtype, times the row scales.
Activations in another dtype are cast to bf16 for the kernel and back (fp32 activations are ~10x slower
in these kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.quant.int4 import dequantize_int4, unpack_int4

# Above this many activation rows a dense matmul on the dequantized weight beats the weight-only kernels
# (prefill); decode (a handful of rows) stays on the kernels.
DENSE_ROWS_CPU = 64
DENSE_ROWS_CUDA = 16
# aten._weight_int8pack_mm makes about one pass over the weight per activation row (the 49152 x 576 int8 head at 16
# rows: 53 ms vs 5.4 at one, one thread on an AVX2 CPU). From INT8_GEMM_ROWS rows (batched decode) the weight is
# widened to fp32 INT8_SLICE_ROWS output rows at a time, into a scratch that stays in cache, and each slice is one
# fp32 GEMM for all rows: 27 ms for the head at 16 rows, no extra memory but the 9 MB scratch.
INT8_GEMM_ROWS = 8
INT8_SLICE_ROWS = 4096


def frozen_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised parameter that is not trained (the loader fills it): the quantized modules' storage."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def int8_kernel_ok(in_features: int) -> bool:
    """aten._weight_int8pack_mm on CPU is only correct for K % 16 == 0 (torch 2.13)."""
    return in_features % 16 == 0


class QuantLinear(nn.Module):
    """Shared plumbing: bias, lazy kernel preparation, flattening leading dims."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._kernel: dict | None = None  # built by finalize(); keyed data for the device's kernel

    def finalize(self) -> None:
        """Build the kernel layout from the loaded parameters (idempotent)."""
        if self._kernel is None:
            self._kernel = self._prepare(self.scales.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self.finalize()
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = x @ (qweight * scales[:, None]).T: int8 symmetric per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.qweight = frozen_param(out_features, in_features, dtype=torch.int8)
        self.scales = frozen_param(out_features, dtype=torch.float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype).unsqueeze(-1)

    def _prepare(self, device: torch.device) -> dict:
        use_kernel = device.type == "cpu" and int8_kernel_ok(self.in_features)
        return {"kernel": use_kernel, "scales_bf16": self.scales.to(torch.bfloat16)}

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel
        if k["kernel"] and INT8_GEMM_ROWS <= x.shape[0] <= DENSE_ROWS_CPU:
            return self._sliced_gemm(x)
        if k["kernel"] and x.shape[0] <= DENSE_ROWS_CPU:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, k["scales_bf16"])
            return y.to(x.dtype)
        # fused dequant matmul: the int8 -> activation dtype cast is the only extra pass over the weight
        dt = x.dtype if x.dtype != torch.float16 or x.is_cuda else torch.float32
        return (F.linear(x.to(dt), self.qweight.to(dt)) * self.scales.to(dt)).to(x.dtype)

    def _sliced_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's product for a few rows (see INT8_GEMM_ROWS), computed [out, rows] so each slice writes
        contiguous rows. x is rounded to bf16 and the scales are the kernel's bf16 ones, so the rows' logits
        differ from the kernel's (a row decoded alone) only in the order of the fp32 sums."""
        k = self._kernel
        if "slice" not in k:
            k["slice"] = torch.empty(min(INT8_SLICE_ROWS, self.out_features), self.in_features, device=x.device)
            k["scales_f32"] = k["scales_bf16"].float()
        xt = x.to(torch.bfloat16).float().t()
        out = torch.empty(self.out_features, x.shape[0], device=x.device)
        for lo in range(0, self.out_features, INT8_SLICE_ROWS):
            w = k["slice"][: min(INT8_SLICE_ROWS, self.out_features - lo)]
            w.copy_(self.qweight[lo : lo + INT8_SLICE_ROWS])
            torch.mm(w, xt, out=out[lo : lo + INT8_SLICE_ROWS])
        return out.t().mul(k["scales_f32"]).to(x.dtype)


class Int4Linear(QuantLinear):
    """Group-wise asymmetric int4: w = (q - zeros) * scales per group of `group_size` input columns."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        n_groups = in_features // group_size
        self.qweight = frozen_param(out_features, in_features // 2, dtype=torch.uint8)
        self.scales = frozen_param(out_features, n_groups, dtype=torch.float16)
        self.zeros = frozen_param(out_features, n_groups, dtype=torch.float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, dtype)

    def _tinygemm_scales_zeros(self) -> torch.Tensor:
        # tinygemm computes w = (q - 8) * scale + offset, ours w = (q - zero) * scale => offset = (8 - zero) * scale
        s, z = self.scales.float(), self.zeros.float()
        return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _prepare(self, device: torch.device) -> dict:
        k = {"packed": None}
        if self.group_size not in (32, 64, 128, 256) or self.in_features % self.group_size:
            return k
        q = unpack_int4(self.qweight)
        try:
            if device.type == "cpu":
                k["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            elif device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
                # CUDA tinygemm wants uint8 [N, K/2] with the even column in the HIGH nibble
                hi_even = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
                k["packed"] = torch.ops.aten._convert_weight_to_int4pack(hi_even.contiguous(), 8)
        except RuntimeError:  # shape the kernel does not support: dequantize-on-the-fly instead
            k["packed"] = None
        if k["packed"] is not None:
            k["sz"] = self._tinygemm_scales_zeros()
        return k

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel
        limit = DENSE_ROWS_CUDA if x.is_cuda else DENSE_ROWS_CPU
        if k["packed"] is not None and x.shape[0] <= limit:
            xb = x.to(torch.bfloat16).contiguous()
            if x.is_cuda:
                y = torch.ops.aten._weight_int4pack_mm(xb, k["packed"], self.group_size, k["sz"])
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, k["packed"], self.group_size, k["sz"])
            return y.to(x.dtype)
        dt = x.dtype if x.dtype != torch.float16 or x.is_cuda else torch.float32
        return F.linear(x.to(dt), self.dequantize(dt)).to(x.dtype)


class Int4OffsetLinear(Int4Linear):
    """Group-wise int4 with a float offset: w = q * scales + offsets (the GGUF Q4_0/Q4_1 block form).

    Used when a GGUF's Q4_1 blocks (w = d*q + m) or Q4_0 blocks (w = d*(q - 8), i.e. offset -8d) are kept
    quantized. Int4Linear's zero point would have to be -m/d rounded to fp16, which is not exact; storing
    the block's own fp16 min as the offset is, so dequantize() reproduces gguf's fp32 result bit for bit
    (d*q is exact in fp32, then one rounding in the add, the same order as ggml). Not a checkpoint format:
    llmcli checkpoints keep Int4Linear's scales/zeros. Same kernels: tinygemm's table is
    [scale, offset + 8 * scale] in bf16, which rounds (measured in tests/formats/test_gguf.py).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, group_size, bias)
        del self.zeros
        self.offsets = frozen_param(out_features, in_features // group_size, dtype=torch.float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.qweight)
        qg = q.reshape(self.out_features, -1, self.group_size).float()
        w = qg * self.scales.float().unsqueeze(-1) + self.offsets.float().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _tinygemm_scales_zeros(self) -> torch.Tensor:
        # tinygemm: w = (q - 8) * scale + offset' => offset' = offsets + 8 * scale
        s, o = self.scales.float(), self.offsets.float()
        return torch.stack([s, o + 8.0 * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class HalfLinear(nn.Module):
    """y = x @ weight.T with an fp16 weight (no bias): the tied head of a GGUF whose token embedding is F16.

    Expanded to fp32, the SmolLM2 head (49152 x 576) is 113 MB read per decoded token: 7.4 ms at batch 1 on one
    core, the largest op of a step. In fp16 (the file's own values, exact) it is half the bytes and oneDNN's fp16
    matmul takes 2.9 ms (the int8 kernel 1.8 ms, but that would requantize). The activation and the logits are
    rounded to fp16 (~3e-4 relative on the logits); the model's other dtypes are unchanged."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen_param(out_features, in_features, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or x.numel() == x.shape[-1]:
            return F.linear(x.to(torch.float16), self.weight).to(x.dtype)
        # CPU fp16 matmul is fast only for one row (37 rows: 151 ms vs 2.9 ms for one); more rows (speculative
        # verification, all-position logits) expand the weight for this call instead
        return F.linear(x.float(), self.weight.float()).to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=float16"
