"""Mixture-of-experts MLP: the per-family routers, stacked experts with sorted grouped dispatch, shared experts.

Every family is the same module with different data:
  mixtral    softmax -> top-k -> renormalise
  qwen2_moe  softmax -> top-k (-> renormalise if norm_topk_prob) + sigmoid-gated shared expert
  qwen3_moe  as qwen2_moe without the shared expert
  deepseek   v2: softmax, greedy or group-limited (group score = max); v3: sigmoid + e_score_correction_bias
             for *selection* only, group score = sum of the group's top-2, weights from the unbiased scores;
             both: * routed_scaling_factor and an ungated shared expert.
Experts are stored stacked, gate_up [E, 2I, H] and down [E, H, I], so dispatch is a grouped matmul and a
quantizer sees one batch of rows per projection instead of E separate Linear modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.layers.activation import activation, gated


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "RouterConfig":
        return cls(cfg.num_experts, cfg.num_experts_per_tok, cfg.router, cfg.norm_topk_prob, cfg.n_group,
                   cfg.topk_group, cfg.routed_scaling_factor)


def route(logits: torch.Tensor, rc: RouterConfig, correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    scores = logits.sigmoid() if rc.scoring == "sigmoid" else logits.softmax(dim=-1)
    # DeepSeek-V3's bias only balances load: it steers which experts are chosen, never how much they weigh.
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if rc.n_group > 1 and rc.topk_group < rc.n_group:
        t, e = choice.shape
        grouped_choice = choice.view(t, rc.n_group, e // rc.n_group)
        if rc.scoring == "sigmoid":  # v3: a group is as good as its two best experts
            group_score = grouped_choice.topk(2, dim=-1).values.sum(-1)
        else:  # v2 group_limited_greedy: as good as its best expert
            group_score = grouped_choice.amax(dim=-1)
        keep = group_score.topk(rc.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // rc.n_group, dim=1), float("-inf"))
    ids = choice.topk(rc.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if rc.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if rc.routed_scaling_factor != 1.0:
        weights = weights * rc.routed_scaling_factor
    return weights, ids


# ---- expert dispatch ---------------------------------------------------------------------------------------

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device/dtype (probed once; older GPUs / dtypes lack a kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_OK:
        try:
            a = torch.zeros(16, w.shape[-1], device=x.device, dtype=x.dtype)
            b = torch.zeros(2, w.shape[-1], 16, device=x.device, dtype=x.dtype)
            torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=x.device, dtype=torch.int32))
            _GROUPED_MM_OK[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


def _selected_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor, act: Callable) -> torch.Tensor:
    """Few tokens (batch-1 decode): gather only the chosen experts' weights, one batched matvec per projection.

    No host sync (CUDA-graph friendly) and no other expert's bytes are read.
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
    h = gated(act, torch.bmm(gate_up.index_select(0, flat), xs).squeeze(-1))  # [T*k, I]
    y = torch.bmm(down.index_select(0, flat), h.unsqueeze(-1)).squeeze(-1)  # [T*k, H]
    return (y.view(t, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def _grouped_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, act: Callable) -> torch.Tensor:
    """Many tokens: sort the (token, expert) pairs by expert and run one grouped matmul per projection."""
    t, k = ids.shape
    e = gate_up.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k  # source token of each sorted pair
    counts = torch.bincount(flat, minlength=e)
    xs = x.index_select(0, token)
    if _grouped_mm_ok(x, gate_up):
        offs = counts.cumsum(0).to(torch.int32)
        h = gated(act, torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs))
        y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)
    else:  # a loop over the experts that have tokens (never over tokens); one host sync for the counts
        parts = []
        for j, (xj, n) in enumerate(zip(xs.split(counts.tolist()), counts.tolist())):
            if n:
                parts.append(F.linear(gated(act, F.linear(xj, gate_up[j])), down[j]))
        y = torch.cat(parts)
    y = y * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, act: Callable) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for x [T, H]; gate_up [E, 2I, H], down [E, H, I]."""
    if x.shape[0] == 1:
        return _selected_experts(x, ids, weights, gate_up, down, act)
    return _grouped_experts(x, ids, weights, gate_up, down, act)


# ---- modules -----------------------------------------------------------------------------------------------

class Router(nn.Module):
    def __init__(self, hidden: int, rc: RouterConfig):
        super().__init__()
        self.rc = rc
        self.weight = nn.Parameter(torch.empty(rc.num_experts, hidden))
        # Only DeepSeek-V3 has the bias (a checkpoint tensor, but not trained by gradient: a buffer).
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(rc.num_experts) if rc.scoring == "sigmoid" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Routing in fp32 for every family: a bf16 near-tie must not flip which expert runs.
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.rc, self.e_score_correction_bias)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act = activation(act)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, ids, weights, self.gate_up, self.down, self.act)


class SharedExpert(nn.Module):
    """A dense gated MLP every token goes through (DeepSeek's n_shared_experts are fused into one wide MLP)."""

    def __init__(self, hidden: int, intermediate: int, act: str, gate: bool):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(hidden, intermediate))
        self.gate = nn.Parameter(torch.empty(1, hidden)) if gate else None  # qwen2_moe's sigmoid gate
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(gated(self.act, F.linear(x, self.gate_up)), self.down)
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x, self.gate)) * y
        return y


class MoE(nn.Module):
    """Drop-in for the dense MLP of a sparse layer: x [T, H] -> [T, H]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rc = RouterConfig.from_model_config(cfg)
        self.router = Router(cfg.hidden_size, self.rc)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared = (SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act,
                                    cfg.shared_expert_gate)
                       if cfg.shared_expert_intermediate_size else None)
        # Tokens routed to each expert since the last reset (router statistics for `llm run --json`).
        # A device tensor updated in place: no host sync on the hot path and safe inside a CUDA graph.
        self.register_buffer("usage", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.router(x)
        self.usage += torch.bincount(ids.reshape(-1), minlength=self.usage.numel())
        y = self.experts(x, ids, weights)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


def expert_usage(model: nn.Module) -> list[list[int]]:
    """Per sparse layer (in model order), how many tokens each expert received since reset_expert_usage."""
    return [m.usage.tolist() for m in model.modules() if isinstance(m, MoE)]


def reset_expert_usage(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.usage.zero_()


# ---- checkpoint weights ------------------------------------------------------------------------------------

def load_moe_weights(moe: MoE, get: Callable[[str], torch.Tensor | None], prefix: str) -> set[str]:
    """Fill `moe` from a checkpoint; `get(name)` returns the tensor stored under a full HF name or None.

    prefix is the layer's prefix, e.g. "model.layers.3.". Accepted layouts:
      per expert  mixtral: block_sparse_moe.experts.{j}.w1 (gate) / w3 (up) / w2 (down)
                  qwen/deepseek: mlp.experts.{j}.gate_proj / up_proj / down_proj
      fused (transformers v5): mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I]
    Returns the names consumed, so the caller can report leftovers.
    """
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        for n in names:
            t = get(n)
            if t is not None:
                used.add(n)
                return t
        raise KeyError(names[0])

    blocks = [prefix + "mlp.", prefix + "block_sparse_moe."]
    block = next((b for b in blocks if get(b + "gate.weight") is not None), None)
    if block is None:
        raise KeyError(prefix + "mlp.gate.weight")
    with torch.no_grad():
        moe.router.weight.copy_(take(block + "gate.weight"))
        if moe.router.e_score_correction_bias is not None:
            moe.router.e_score_correction_bias.copy_(
                take(block + "gate.e_score_correction_bias", block + "e_score_correction_bias"))
        ex = block + "experts."
        if get(ex + "gate_up_proj") is not None:
            moe.experts.gate_up.copy_(take(ex + "gate_up_proj"))
            moe.experts.down.copy_(take(ex + "down_proj"))
        else:
            for j in range(moe.rc.num_experts):
                e = f"{ex}{j}."
                gate = take(e + "gate_proj.weight", e + "w1.weight")
                up = take(e + "up_proj.weight", e + "w3.weight")
                moe.experts.gate_up[j].copy_(torch.cat([gate, up], 0))
                moe.experts.down[j].copy_(take(e + "down_proj.weight", e + "w2.weight"))
        if moe.shared is not None:
            s = next(s for s in (block + "shared_experts.", block + "shared_expert.")
                     if get(s + "down_proj.weight") is not None)
            moe.shared.gate_up.copy_(torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")], 0))
            moe.shared.down.copy_(take(s + "down_proj.weight"))
            if moe.shared.gate is not None:
                moe.shared.gate.copy_(take(block + "shared_expert_gate.weight"))
    return used
