"""Quantized MoE experts: INT8/INT4 weights of all E experts stacked per projection, run through linear.py's kernels.

Replaces llmcli.layers.moe.Experts (same forward contract) when a checkpoint is quantized. Each of the two
projections is a QuantExpertProj holding the on-disk layout of int8.py / int4.py with a leading expert dim:
  gate_up_proj  qweight [E, 2I, H] int8 | [E, 2I, H/2] uint8, scales (and int4 zeros) [E, 2I] | [E, 2I, H/g]
  down_proj     qweight [E, H, I]  int8 | [E, H, I/2]  uint8, scales (and int4 zeros) [E, H]  | [E, H, I/g]
Rows are output channels, so expert j's gate and up rows are independent slices and INT4 groups never cross an
expert; group size follows the same rule as dense layers (effective_group_size of that projection's input size).

Checkpoint names: the quantizer keeps the source's spelling (it streams one source tensor at a time), so both
load by name: per-expert `mlp.experts.{j}.gate_proj.qweight` (up_proj/down_proj, mixtral's w1/w3/w2; filled by
MoE.load_hf_weight) and stacked `mlp.experts.gate_up_proj.qweight` (from transformers v5 fused checkpoints).
Methods: rtn and hqq as for dense layers; gptq's calibration hooks see nn.Linear inputs only, so the writer gives
experts hqq (INT4) / rtn (INT8) and says so in the summary. NF4 leaves experts 16-bit (no bitsandbytes layout).

Kernels: expert j of a projection runs as an Int8Linear/Int4Linear whose parameters are *views* of row block j
of the stacked tensors (no copy of the plain layout), so the CPU/CUDA kernel choice, the K % 16 guard and the
dense fallback for many rows are linear.py's. Their packed kernel layouts are built for every expert by
finalize(), or lazily for just the experts a batch selects; either way a step reads only selected experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmcli.estimate import effective_group_size
from llmcli.layers.activation import gated
from llmcli.layers.moe import dispatch_sorted, each_active_expert
from llmcli.quant.linear import Int4Linear, Int8Linear, QuantLinear, frozen_param


class QuantExpertProj(nn.Module):
    """One projection of E experts, weight [E, out, in], quantized to `bits` (int4: groups of group_size)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bits: int, group_size: int = 128):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.bits = num_experts, in_features, out_features, bits
        self.group_size = effective_group_size(in_features, group_size) if bits == 4 else None
        if bits == 8:
            self.qweight = frozen_param(num_experts, out_features, in_features, dtype=torch.int8)
            self.scales = frozen_param(num_experts, out_features, dtype=torch.float16)
        else:
            n_groups = in_features // self.group_size
            self.qweight = frozen_param(num_experts, out_features, in_features // 2, dtype=torch.uint8)
            self.scales = frozen_param(num_experts, out_features, n_groups, dtype=torch.float16)
            self.zeros = frozen_param(num_experts, out_features, n_groups, dtype=torch.float16)
        # Per-expert kernel objects, a plain list on purpose: not submodules, so they add no parameter names
        # (the loader and state_dict see only the stacked tensors).
        self._experts: list[QuantLinear | None] = [None] * num_experts

    def _build(self, j: int) -> QuantLinear:
        with torch.device("meta"):  # constructed empty; its parameters are then replaced by views of expert j
            lin = (
                Int8Linear(self.in_features, self.out_features)
                if self.bits == 8
                else Int4Linear(self.in_features, self.out_features, self.group_size)
            )
        for name in ("qweight", "scales", "zeros"):
            if name in self._parameters:
                setattr(lin, name, nn.Parameter(self._parameters[name][j], requires_grad=False))
        lin.finalize()
        return lin

    def expert(self, j: int) -> QuantLinear:
        """Expert j as a quantized Linear (kernel layout built on first use)."""
        lin = self._experts[j]
        if lin is None:
            lin = self._experts[j] = self._build(j)
        return lin

    def finalize(self) -> None:
        for j in range(self.num_experts):
            self.expert(j)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}{g}"
        )


class QuantExperts(nn.Module):
    """Drop-in for layers.moe.Experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I], quantized."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, act: Callable, bits: int, group_size: int = 128
    ):
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = QuantExpertProj(num_experts, hidden, 2 * intermediate, bits, group_size)
        self.down_proj = QuantExpertProj(num_experts, intermediate, hidden, bits, group_size)
        self.act = act

    def _expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.expert(j)(gated(self.act, self.gate_up_proj.expert(j)(x)))

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        # No grouped-matmul kernel takes packed int weights: one quantized matmul per projection per active expert.
        return dispatch_sorted(x, ids, weights, each_active_expert(self._expert), self.num_experts, counts)


def experts_quantizable(experts: nn.Module, bits: int) -> bool:
    """Whether a float Experts block can be quantized to `bits` (int4 packs two input columns per byte)."""
    _, two_i, hidden = experts.gate_up_proj.shape
    return bits == 8 or (hidden % 2 == 0 and (two_i // 2) % 2 == 0)


def make_quant_experts(experts: nn.Module, bits: int, group_size: int) -> QuantExperts:
    """The quantized twin of a layers.moe.Experts block (shapes read from it; works on the meta device)."""
    e, two_i, hidden = experts.gate_up_proj.shape
    return QuantExperts(e, hidden, two_i // 2, experts.act, bits, group_size)
