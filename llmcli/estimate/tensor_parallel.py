"""How a model splits over N tensor-parallel ranks: which heads and MLP columns each rank holds, and its config.

Attention is split by KV groups: a rank holds whole KV heads and the query heads that read them, so no rank needs
another's keys. When there are fewer KV heads than ranks, each KV head is replicated on N / num_kv_heads ranks
(vLLM's rule) and its query heads are divided between those replicas. Counts that do not divide evenly are split
as evenly as possible (SmolLM2-135M's 3 KV heads over 2 ranks: 2 and 1), so a rank's share is its own config.
MLP widths (dense, routed experts, shared experts) are split in `unit`-wide chunks: an INT4 row-parallel
projection can only be cut at its group boundaries. MLA keeps its latent cache whole on every rank (it is one
shared "head") and splits the query heads. Embeddings and lm_head are replicated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.estimate import Options, activation_bytes, kv_bytes, kv_bytes_per_token, option_weight_bytes, weight_bytes


@dataclass(frozen=True)
class RankShare:
    """Half-open ranges of one rank: query heads, KV heads, and columns of each MLP width."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    moe_intermediate: tuple[int, int]
    shared_intermediate: tuple[int, int]


def split(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into `parts` contiguous ranges of whole units, sizes differing by at most one unit."""
    units = n // unit
    base, extra = divmod(units, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + (base + (r < extra)) * unit
        out.append((lo, hi))
        lo = hi
    return out


def _heads(config: ModelConfig, world: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(query heads, KV heads) of each rank."""
    h, kvh = config.num_heads, config.num_kv_heads
    if config.is_mla:  # one latent shared by all heads, replicated: split the query heads only
        if h < world:
            raise UserError(f"--tensor-parallel {world}: the model has only {h} attention heads to split")
        return [(q, (0, kvh)) for q in split(h, world)]
    group = h // kvh
    if kvh >= world:
        return [((a * group, b * group), (a, b)) for a, b in split(kvh, world)]
    if world % kvh or group % (world // kvh):
        raise UserError(
            f"--tensor-parallel {world}: the model's {kvh} KV heads (with {h} query heads) cannot be shared by "
            f"{world} ranks; use at most {kvh} ranks, or a multiple of {kvh} that divides {h}"
        )
    rep = world // kvh
    out = []
    for r in range(world):
        kv = r // rep
        lo, hi = split(group, rep)[r % rep]
        out.append(((kv * group + lo, kv * group + hi), (kv, kv + 1)))
    return out


def _width(n: int, world: int, unit: int, what: str) -> list[tuple[int, int]]:
    if n == 0:
        return [(0, 0)] * world
    if n // unit < world:
        raise UserError(f"--tensor-parallel {world}: the {what} of {n} cannot be split {world} ways")
    return split(n, world, unit)


def plan(config: ModelConfig, world: int, unit: int = 1) -> list[RankShare]:
    """Each rank's share (UserError with the numbers when the model cannot be split `world` ways)."""
    if world < 1:
        raise UserError(f"--tensor-parallel must be at least 1 (got {world})")
    heads = _heads(config, world)
    dense = _width(config.intermediate_size, world, unit, "MLP width") if _has_dense(config) else [(0, 0)] * world
    moe = _width(config.moe_intermediate_size, world, unit, "expert width") if config.is_moe else [(0, 0)] * world
    shared = _width(config.shared_expert_intermediate_size, world, unit, "shared expert width")
    return [RankShare(q, kv, d, m, s) for (q, kv), d, m, s in zip(heads, dense, moe, shared)]


def _has_dense(config: ModelConfig) -> bool:
    return not config.is_moe or not all(config.is_moe_layer(i) for i in range(config.num_layers))


def _size(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def rank_config(config: ModelConfig, share: RankShare) -> ModelConfig:
    """The config of one rank's part of the model: its head counts and MLP widths (the engine sizes that rank's
    KV cache from it). MLA keeps every KV value (the replicated latent)."""
    return dataclasses.replace(
        config,
        num_heads=_size(share.q_heads),
        num_kv_heads=config.num_kv_heads if config.is_mla else _size(share.kv_heads),
        intermediate_size=_size(share.intermediate) if _has_dense(config) else config.intermediate_size,
        moe_intermediate_size=_size(share.moe_intermediate),
        shared_expert_intermediate_size=_size(share.shared_intermediate),
    )


def largest_rank_config(config: ModelConfig, world: int) -> ModelConfig:
    """The config of the rank holding the most KV heads and weights (rank 0: the splits give it the extra)."""
    return rank_config(config, plan(config, world)[0])


@dataclass(frozen=True)
class DeviceShare:
    """Memory of the busiest device (rank 0) when the model runs on `world` ranks."""

    world: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    total_bytes: int  # weights + KV + activations (activations are per device, as without tensor parallelism)


def per_device(cfg: ModelConfig, opts: Options, world: int) -> DeviceShare:
    """Weights and KV cache of rank 0's share. A checkpoint's stored size (a GGUF's tensors) is scaled by the share
    its parameters are of the whole (16-bit formula), which is exact when every matrix has one type."""
    share = largest_rank_config(cfg, world)
    if opts.stored_weight_bytes is not None:
        w = opts.stored_weight_bytes * weight_bytes(share, "bf16") // weight_bytes(cfg, "bf16")
    else:
        w = option_weight_bytes(share, opts)
    kv = kv_bytes(share, opts.context, opts.batch, opts.kv_dtype)
    act = activation_bytes(cfg, opts.context, opts.batch, opts.act_bytes)
    return DeviceShare(world, w, kv_bytes_per_token(share, opts.kv_dtype), kv, w + kv + act)
