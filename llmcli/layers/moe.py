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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.layers.activation import activation, gated
from llmcli.layers.mlp import MLP


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
    def from_model_config(cls, cfg: ModelConfig) -> RouterConfig:
        return cls(
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.router,
            cfg.norm_topk_prob,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
        )


def route(
    logits: torch.Tensor, rc: RouterConfig, correction_bias: torch.Tensor | None = None
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
            # same operand layout as the real call: stacked [E, out, in] weights viewed as [E, in, out]
            a = torch.zeros(16, w.shape[-1], device=x.device, dtype=x.dtype)
            b = torch.zeros(2, 16, w.shape[-1], device=x.device, dtype=x.dtype).transpose(1, 2)
            torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=x.device, dtype=torch.int32))
            _GROUPED_MM_OK[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


def _selected_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable
) -> torch.Tensor:
    """Few tokens (batch-1 decode): gather only the chosen experts' weights, one batched matvec per projection.

    No host sync (CUDA-graph friendly) and no other expert's bytes are read.
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
    h = gated(act, torch.bmm(gate_up.index_select(0, flat), xs).squeeze(-1))  # [T*k, I]
    y = torch.bmm(down.index_select(0, flat), h.unsqueeze(-1)).squeeze(-1)  # [T*k, H]
    return (y.view(t, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def _grouped_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: Callable,
    grouped_mm: bool,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sort the (token, expert) pairs by expert, run each expert once on its contiguous run of tokens.

    grouped_mm: one torch._grouped_mm per projection (no host sync; empty groups cost nothing). Otherwise a
    loop over the experts that received tokens (never over tokens), indexing the stacked weights in place.
    """
    if grouped_mm:

        def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            offs = counts.cumsum(0).to(torch.int32)
            h = gated(act, torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs))
            return torch._grouped_mm(h, down.transpose(1, 2), offs=offs)
    else:
        run = each_active_expert(lambda j, xj: F.linear(gated(act, F.linear(xj, gate_up[j])), down[j]))
    return dispatch_sorted(x, ids, weights, run, gate_up.shape[0], counts)


def dispatch_sorted(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_experts: int,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for x [T, H], the expert math left to `run`.

    The (token, expert) pairs are sorted by expert; run(xs, counts) gets their inputs xs [T*k, H] in that order
    (counts [E]: rows per expert, contiguous) and returns every row's expert output. Shared by the float
    experts here and the quantized ones (llmcli.quant.experts), so both route and combine identically.
    """
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k  # source token of each sorted pair
    if counts is None:
        counts = torch.bincount(flat, minlength=num_experts)
    y = run(x.index_select(0, token), counts)
    y = y * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


def each_active_expert(
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A dispatch_sorted `run` calling expert(j, rows of j) for each expert that has rows: a loop over the
    active experts (never over tokens), one host sync per layer; unselected experts are never touched."""

    def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        sizes = counts.tolist()
        return torch.cat([expert(j, xj) for j, xj in enumerate(xs.split(sizes)) if sizes[j]])

    return run


def experts_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: Callable,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for x [T, H]; gate_up [E, 2I, H], down [E, H, I].

    Every path reads only the experts that some token selected.
    CUDA: grouped matmul (graph-safe, no sync); without a kernel for this GPU/dtype, batch-1 decode gathers
    its k experts (still no sync) and larger batches loop over the active experts.
    CPU: the active-expert loop; a host sync is free there and it avoids copying weights (measured on
    E=64, H=2048, I=1408, k=6: as fast as _grouped_mm, 25% faster than the gather at one token).
    """
    if x.is_cuda:
        if _grouped_mm_ok(x, gate_up):
            try:
                return _grouped_experts(x, ids, weights, gate_up, down, act, grouped_mm=True, counts=counts)
            except RuntimeError:  # a shape the kernel rejects (alignment): fall back for good
                _GROUPED_MM_OK[(x.device.type, x.dtype)] = False
        if x.shape[0] == 1:
            return _selected_experts(x, ids, weights, gate_up, down, act)
    return _grouped_experts(x, ids, weights, gate_up, down, act, grouped_mm=False, counts=counts)


# ---- modules -----------------------------------------------------------------------------------------------


class Router(nn.Module):
    """`gate` in checkpoints: weight [E, H] (+ DeepSeek-V3's e_score_correction_bias). Kept out of nn.Linear on
    purpose: it is tiny, runs in fp32, and a quantizer must not touch it."""

    def __init__(self, hidden: int, rc: RouterConfig):
        super().__init__()
        self.rc = rc
        self.weight = nn.Parameter(torch.empty(rc.num_experts, hidden))
        # A checkpoint tensor that is not trained by gradient: a buffer. fp32 whatever the model dtype (like the
        # reference): it is added to sigmoid scores, where bf16's 3 digits would reorder close experts.
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(rc.num_experts, dtype=torch.float32) if rc.scoring == "sigmoid" else None,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Routing in fp32 for every family: a bf16 near-tie must not flip which expert runs.
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.rc, self.e_score_correction_bias)


class Experts(nn.Module):
    """Stacked experts under transformers v5's names, so fused checkpoints load by name."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [gate; up] rows
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act = activation(act)

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        return experts_forward(x, ids, weights, self.gate_up_proj, self.down_proj, self.act, counts)


# per-expert checkpoint projection -> (stacked parameter, row half: 0 gate, 1 up, None whole)
PER_EXPERT = {
    "gate_proj": ("gate_up_proj", 0),
    "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
    "w2": ("down_proj", None),
}


class MoE(nn.Module):
    """Drop-in for the dense MLP of a sparse layer: x [..., H] -> [..., H].

    Modules (checkpoint names): gate (Router), experts (stacked), and the shared expert as the engine's dense
    MLP under the family's name (`shared_experts` for DeepSeek, `shared_expert` + `shared_expert_gate` for
    Qwen2-MoE) so the loader fills its fused gate_up rows like any other MLP.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int | None = None):
        super().__init__()
        self.rc = RouterConfig.from_model_config(cfg)
        self.gate = Router(cfg.hidden_size, self.rc)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size:
            shared = MLP(cfg, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_gate:  # qwen2_moe: sigmoid(x . w) scales the shared expert per token
                self.shared_expert = shared
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            else:
                self.shared_experts = shared
        # Tokens routed to each expert since the last reset (router statistics for `llm run --json`).
        # A device tensor updated in place: no host sync on the hot path and safe inside a CUDA graph.
        self.register_buffer("usage", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        self._filled: set[tuple[int, str, int | None]] = set()

    @property
    def shared(self) -> nn.Module | None:
        return self._modules.get("shared_experts") or self._modules.get("shared_expert")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        counts = torch.bincount(ids.reshape(-1), minlength=self.usage.numel())  # tokens per expert
        self.usage += counts
        y = self.experts(x, ids, weights, counts)
        shared = self.shared
        if shared is not None:
            s = shared(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            y = y + s
        return y.view(shape)

    def load_hf_weight(self, suffix: str, tensor: torch.Tensor) -> bool:
        """Loader hook for what does not load by name: per-expert tensors and the router's bias.

        suffix is relative to this module: "experts.{j}.gate_proj.weight" (qwen/deepseek),
        "experts.{j}.w1.weight" (mixtral; the loader maps block_sparse_moe -> mlp), "gate.e_score_correction_bias";
        quantized experts (llmcli.quant.experts) take "experts.{j}.gate_proj.qweight" / scales / zeros the same way.
        """
        parts = suffix.split(".")
        with torch.no_grad():
            if parts[-1] == "e_score_correction_bias" and self.gate.e_score_correction_bias is not None:
                self.gate.e_score_correction_bias.copy_(tensor)
                return True
            if len(parts) != 4 or parts[0] != "experts" or parts[2] not in PER_EXPERT:
                return False
            j = int(parts[1])
            pname, half = PER_EXPERT[parts[2]]
            # float experts: the stacked parameter itself; quantized: that projection's qweight/scales/zeros
            p = getattr(self.experts, pname)
            if parts[3] != "weight":
                p = p._parameters.get(parts[3]) if isinstance(p, nn.Module) else None
            if not isinstance(p, torch.Tensor):
                return False
            # every quantized tensor is indexed [expert, out row, ...], so gate/up halves split the same way
            dst = p[j] if half is None else p[j].chunk(2, dim=0)[half]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise UserError(
                    f"expert weight {suffix} has shape {tuple(tensor.shape)}, the config expects {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            key = f"{pname}.{parts[3]}"
            self._filled.add((j, key, half))
            # the loader's missing-weights check trusts this flag: set it only once every expert is complete
            need = self.rc.num_experts * (1 if half is None else 2)
            p._llmcli_loaded = sum(f[1] == key for f in self._filled) == need
            return True


def expert_usage(model: nn.Module) -> dict[int, list[int]]:
    """{layer index: tokens routed to each expert} for every sparse layer, since reset_expert_usage.

    The router statistics `llm run --json` reports; {} for a dense model."""
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else []
    return {
        i: layer.mlp.usage.tolist() for i, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), MoE)
    }


def reset_expert_usage(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.usage.zero_()
