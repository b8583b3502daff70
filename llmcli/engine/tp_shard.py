"""Cut a loaded model down to one tensor-parallel rank's share, in place (gpt-fast's scheme).

Column-parallel (output rows kept per rank): the fused q/k/v rows of this rank's query and KV heads, the fused
[gate; up] rows of its MLP columns, MLA's q_proj / q_b_proj / kv_b_proj rows of its heads. Row-parallel (input
columns kept): o_proj and down_proj (dense, shared and routed experts), each followed by one all-reduce (a
forward hook on o_proj, on the dense MLP's down_proj, and on the whole MoE block, whose routed and shared experts
are summed before the reduction). A row-parallel bias is kept on rank 0 only, so the sum adds it once. Routers,
norms, embeddings, lm_head and MLA's latent projection are replicated: every rank sees the same all-reduced input,
so every rank routes to the same experts.

INT8 (per-row scales) and INT4 (per-group scales and zeros/offsets) weights are cut along the same dimensions;
an INT4 row-parallel cut must fall on a group boundary (the plan splits MLP widths in whole groups). Other
quantized layouts (NF4) are refused with a one-line error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.estimate.tensor_parallel import RankShare, plan, rank_config
from llmcli.layers.attention import Attention
from llmcli.layers.mla import MLAttention
from llmcli.layers.mlp import MLP
from llmcli.layers.moe import Experts, MoE
from llmcli.quant.experts import QuantExpertProj
from llmcli.quant.linear import Int4Linear, QuantLinear

_QUANT_TENSORS = ("qweight", "scales", "zeros", "offsets")


def _unsupported(m: nn.Module) -> UserError:
    return UserError(f"--tensor-parallel cannot split {type(m).__name__} layers (supported: float, INT8, INT4)")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


def take_rows(m: nn.Module, rows: torch.Tensor) -> None:
    """Keep output rows `rows` of a linear (float or quantized; QuantExpertProj: of every expert)."""
    if isinstance(m, nn.Linear):
        names, dim = ("weight", "bias"), 0
    elif isinstance(m, QuantLinear):
        names, dim = (*_QUANT_TENSORS, "bias"), 0
    elif isinstance(m, QuantExpertProj):
        names, dim = _QUANT_TENSORS, 1
    else:
        raise _unsupported(m)
    rows = rows.to(next(m.parameters()).device)
    for name in names:
        p = m._parameters.get(name)
        if p is not None:
            m._parameters[name] = _param(p.index_select(dim, rows))
    m.out_features = rows.numel()
    _reset_kernels(m)


def take_cols(m: nn.Module, lo: int, hi: int, keep_bias: bool) -> None:
    """Keep input columns [lo, hi) of a linear; its bias only where keep_bias (row-parallel: rank 0)."""
    if isinstance(m, nn.Linear):
        m.weight = _param(m.weight[:, lo:hi])
    elif isinstance(m, QuantLinear | QuantExpertProj):
        group = m.group_size if isinstance(m, Int4Linear | QuantExpertProj) and m.group_size else None
        if group and (lo % group or hi % group):
            raise UserError(
                f"--tensor-parallel: INT4 input columns {lo}-{hi} of a {m.in_features}-wide layer do not fall on "
                f"its {group}-column groups; use another --tensor-parallel count"
            )
        for name in _QUANT_TENSORS:
            p = m._parameters.get(name)
            if p is None:
                continue
            if name == "qweight":
                a, b = (lo // 2, hi // 2) if p.dtype == torch.uint8 else (lo, hi)  # int4 packs two columns a byte
            elif group:
                a, b = lo // group, hi // group
            else:
                continue  # int8 scales are per output row
            m._parameters[name] = _param(p[..., a:b])
    else:
        raise _unsupported(m)
    if not keep_bias and getattr(m, "bias", None) is not None:
        m.bias = None
    m.in_features = hi - lo
    _reset_kernels(m)


def _reset_kernels(m: nn.Module) -> None:
    if isinstance(m, QuantLinear):
        m._kernel = None
    elif isinstance(m, QuantExpertProj):
        m._experts = [None] * m.num_experts


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def _fused_rows(parts: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in parts])


def _shard_attention(attn: Attention, share: RankShare, rank: int) -> None:
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    (q0, q1), (k0, k1) = share.q_heads, share.kv_heads
    rows = [(q0 * d, q1 * d), ((h + k0) * d, (h + k1) * d), ((h + kvh + k0) * d, (h + kvh + k1) * d)]
    take_rows(attn.qkv_proj, _fused_rows(rows))
    take_cols(attn.o_proj, q0 * d, q1 * d, keep_bias=rank == 0)
    attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0


def _shard_mla(attn: MLAttention, share: RankShare, rank: int) -> None:
    q0, q1 = share.q_heads
    qk, kv = attn.nope + attn.rope, attn.nope + attn.v_dim
    q_proj = attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj
    take_rows(q_proj, torch.arange(q0 * qk, q1 * qk))
    take_rows(attn.kv_b_proj, torch.arange(q0 * kv, q1 * kv))
    take_cols(attn.o_proj, q0 * attn.v_dim, q1 * attn.v_dim, keep_bias=rank == 0)
    attn.num_heads, attn._kv_b_dense = q1 - q0, None


def _shard_mlp(mlp: MLP, cols: tuple[int, int], rank: int) -> None:
    lo, hi = cols
    width = mlp.down_proj.in_features
    take_rows(mlp.gate_up_proj, _fused_rows([(lo, hi), (width + lo, width + hi)]))
    take_cols(mlp.down_proj, lo, hi, keep_bias=rank == 0)


def _shard_experts(experts: nn.Module, cols: tuple[int, int]) -> None:
    lo, hi = cols
    width = experts.intermediate
    rows = _fused_rows([(lo, hi), (width + lo, width + hi)])
    if isinstance(experts, Experts):
        experts.gate_up_proj = _param(experts.gate_up_proj.index_select(1, rows.to(experts.gate_up_proj.device)))
        experts.down_proj = _param(experts.down_proj[:, :, lo:hi])
    else:  # QuantExperts: each projection holds every expert's qweight/scales/zeros
        take_rows(experts.gate_up_proj, rows)
        take_cols(experts.down_proj, lo, hi, keep_bias=True)
    experts.intermediate = hi - lo


def _shard_moe(moe: MoE, share: RankShare, rank: int) -> None:
    _shard_experts(moe.experts, share.moe_intermediate)
    if moe.shared is not None:
        _shard_mlp(moe.shared, share.shared_intermediate, rank)
    moe.register_forward_hook(_all_reduce_output)


def int4_unit(model: nn.Module) -> int:
    """The widest INT4 group of a row-parallel MLP projection: MLP widths are split in multiples of it."""
    unit = 1
    for name, m in model.named_modules():
        if name.endswith("down_proj") and isinstance(m, Int4Linear | QuantExpertProj) and m.group_size:
            unit = max(unit, m.group_size)
    return unit


def shard_model(model: nn.Module, config: ModelConfig, rank: int, world: int) -> ModelConfig:
    """Cut `model` (built and loaded whole) to rank's share; returns that rank's ModelConfig (its heads and MLP
    widths, from which the engine sizes its KV cache). Call on every rank with the same model."""
    share = plan(config, world, int4_unit(model))[rank]
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if isinstance(attn, MLAttention):
                _shard_mla(attn, share, rank)
            else:
                _shard_attention(attn, share, rank)
            attn.o_proj.register_forward_hook(_all_reduce_output)
            if isinstance(layer.mlp, MoE):
                _shard_moe(layer.mlp, share, rank)
            else:
                _shard_mlp(layer.mlp, share.intermediate, rank)
                layer.mlp.down_proj.register_forward_hook(_all_reduce_output)
    return rank_config(config, share)
