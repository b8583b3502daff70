"""One normalized ModelConfig for every architecture we know.

Per-family differences are data: FAMILIES maps each family to its FamilyTraits (flags, and rules or
readers for what is computed: which layers slide, which projections have biases, experts, latent
attention), and from_hf_dict reads a Hugging Face `config.json` dict through it once; the engine, the
estimator and the quantizer only ever look at a ModelConfig.
Both the older key spellings (rope_theta/rope_scaling, num_experts) and transformers v5's
(rope_parameters, num_local_experts) are accepted, because hub repos carry either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmcli.errors import UserError

# --kv-dtype names: the KV cache's storage format (llmcli.layers.kv_cache maps them to dtypes). Here, not there,
# so the CLI can check the flag without importing torch.
KV_DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32", "int8", "fp8")
# --compile modes of the batch-1 decode step (llmcli.engine.compiled_step), here for the same reason
COMPILE_MODES = ("auto", "on", "off")

FULL = "full_attention"
SLIDING = "sliding_attention"

# rule(cfg, num_layers) -> FULL/SLIDING per layer, for a sliding-window config that names no layer_types
WindowRule = Callable[[dict, int], tuple[str, ...]]


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    # norms and MLP
    norm_type: str = "rms"  # "rms" | "layer" (LayerNorm: gpt2, gpt_neox, phi, bloom, mpt, falcon)
    norm_bias: bool = True  # LayerNorm has a bias (mpt's has none)
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # gemma stores w-1 and scales by (1 + w)
    hidden_act: str = "silu"  # silu | gelu_tanh | gelu
    gated_mlp: bool = True  # gate/up/down (SwiGLU/GeGLU) vs fc/proj
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3, gemma3)
    sandwich_norm: bool = False  # gemma2/3: extra norm after attention and around the MLP
    parallel_residual: bool = False  # gpt_neox, falcon-40b: x + attn(ln1 x) + mlp(ln2 x)
    shared_norm: bool = False  # phi, falcon-7b: one norm per layer, its output feeds attention and MLP (parallel)
    embedding_norm: bool = False  # bloom: a LayerNorm right after the token embedding
    lm_head_bias: bool = False  # phi's output projection has a bias
    qkv_clip: float | None = None  # mpt clip_qkv: q/k/v clamped to [-clip, clip]
    tie_word_embeddings: bool = False
    embedding_scale: float | None = None  # gemma multiplies embeddings by sqrt(hidden)
    # positions
    position_embedding: str = "rope"  # "rope" | "learned" (gpt2) | "alibi" (bloom, mpt: linear score biases)
    alibi_max_bias: float = 8.0  # ALiBi slopes are 2^(-max_bias * i / n) (mpt's alibi_bias_max)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"yarn"|"longrope"|..., ...}
    rope_local_theta: float | None = None  # gemma3: sliding layers use another base
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # attention
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()  # which layers have a sparse MLP
    shared_expert_intermediate_size: int = 0  # total width of the shared expert(s); 0: none
    shared_expert_gate: bool = False  # qwen2_moe: sigmoid(Linear(hidden, 1)) scales the shared expert
    norm_topk_prob: bool = False
    router: str = "softmax"  # "softmax" | "sigmoid" (deepseek_v3, with e_score_correction_bias)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (deepseek_v2/v3); kv_lora_rank == 0: ordinary attention
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # deepseek: rope rotates adjacent pairs (x0, x1), (x2, x3), ...
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived views -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers and self.moe_layers[i])

    def layer_window(self, i: int) -> int | None:
        """Tokens layer i attends to (None: the whole context)."""
        if self.layer_types and self.layer_types[i] == SLIDING:
            return self.sliding_window
        return None

    @property
    def rotary_dim(self) -> int:
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def softmax_scale(self) -> float:
        if self.attn_scale is not None:
            return self.attn_scale
        return self.qk_head_dim**-0.5

    def alibi_slopes(self) -> list[float]:
        """Per-head ALiBi slopes (Press et al.): a geometric sequence for the nearest power of two of heads,
        then every other slope of the next power's sequence for the remaining heads (bloom and mpt agree)."""
        n = self.num_heads
        p = 2 ** math.floor(math.log2(n))

        def geometric(k: int) -> list[float]:
            return [2.0 ** (-self.alibi_max_bias * (i + 1) / k) for i in range(k)]

        return (geometric(p) + geometric(2 * p)[0::2])[:n]

    def kv_values_per_token(self, i: int) -> int:
        """Values layer i caches per token: K and V for each KV head, or MLA's latent + rope key."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_cache_groups(self, i: int) -> int:
        """How many separate [slots, values] planes layer i's cache is split into: one per (K or V, KV head),
        so a head's keys over consecutive slots are contiguous; MLA caches one latent row per token."""
        return 1 if self.is_mla else 2 * self.num_kv_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _rope(cfg: dict) -> tuple[float, dict | None, float | None, float]:
    """(theta, scaling, local theta, partial rotary factor) from either key spelling."""
    params = cfg.get("rope_parameters")
    local_theta = cfg.get("rope_local_base_freq")
    if isinstance(params, dict) and FULL in params:  # gemma3 in transformers v5: one entry per layer type
        local_theta = params.get(SLIDING, {}).get("rope_theta", local_theta)
        params = params[FULL]
    params = dict(params or {})
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    theta = float(_first(cfg, "rope_theta", "rotary_emb_base", default=params.get("rope_theta", 10000.0)))
    partial = float(
        _first(cfg, "partial_rotary_factor", "rotary_pct", default=params.get("partial_rotary_factor", 1.0))
    )
    return theta, scaling, local_theta, partial


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _layer_types(cfg: dict, rule: WindowRule, n: int, window: int | None) -> tuple[str, ...]:
    if not window:
        return (FULL,) * n
    lt = cfg.get("layer_types")
    if lt and len(lt) == n:
        return tuple(SLIDING if t == SLIDING else FULL for t in lt)
    return rule(cfg, n)


# ---- which layers slide when a config names no layer_types --------------------------------------------------


def _all_sliding(cfg: dict, n: int) -> tuple[str, ...]:
    return (SLIDING,) * n


def _even_layers_slide(cfg: dict, n: int) -> tuple[str, ...]:  # gemma2
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))


def _gemma3_pattern(cfg: dict, n: int) -> tuple[str, ...]:  # every pattern-th layer is global
    pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))


def _qwen_window_layers(cfg: dict, n: int) -> tuple[str, ...]:  # layers from max_window_layers on slide
    start = cfg.get("max_window_layers", n)
    return tuple(SLIDING if i >= start else FULL for i in range(n))


# ---- which projections have biases: (q/k/v, o, mlp) --------------------------------------------------------


def _attention_bias(cfg: dict) -> tuple[bool, bool, bool]:
    bias = bool(cfg.get("attention_bias", False))
    return bias, bias, bool(cfg.get("mlp_bias", False))


def _qwen2_bias(cfg: dict) -> tuple[bool, bool, bool]:  # q/k/v biased by default, never o
    return bool(cfg.get("qkv_bias", True)), False, bool(cfg.get("mlp_bias", False))


def _neox_bias(cfg: dict) -> tuple[bool, bool, bool]:  # attention_bias (on by default); the MLP always has one
    bias = bool(cfg.get("attention_bias", True))
    return bias, bias, True


def _all_bias(cfg: dict) -> tuple[bool, bool, bool]:  # phi: every projection
    return True, True, True


# ---- readers for what is computed, not flagged: experts and latent attention ----------------------------------


def _mixtral_experts(mc: ModelConfig, cfg: dict) -> None:
    mc.num_experts = _first(cfg, "num_local_experts", "num_experts", default=8)
    mc.num_experts_per_tok = cfg.get("num_experts_per_tok", 2)
    mc.moe_intermediate_size = mc.intermediate_size
    mc.norm_topk_prob = True
    mc.moe_layers = (True,) * mc.num_layers


def _qwen_moe_experts(mc: ModelConfig, cfg: dict) -> None:
    """Sparse every decoder_sparse_step-th layer, except mlp_only_layers."""
    mc.num_experts = _first(cfg, "num_experts", "num_local_experts", default=0)
    mc.num_experts_per_tok = cfg.get("num_experts_per_tok", 1)
    mc.moe_intermediate_size = cfg.get("moe_intermediate_size", mc.intermediate_size)
    mc.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    mc.moe_layers = tuple(i not in dense and mc.num_experts > 0 and (i + 1) % step == 0 for i in range(mc.num_layers))


def _qwen2_shared_expert(mc: ModelConfig, cfg: dict) -> None:
    mc.shared_expert_intermediate_size = cfg.get("shared_expert_intermediate_size", 0)
    mc.shared_expert_gate = mc.shared_expert_intermediate_size > 0


def _deepseek_mla(mc: ModelConfig, cfg: dict) -> None:
    mc.q_lora_rank = cfg.get("q_lora_rank")
    mc.kv_lora_rank = cfg["kv_lora_rank"]
    mc.qk_nope_head_dim = cfg["qk_nope_head_dim"]
    mc.qk_rope_head_dim = cfg["qk_rope_head_dim"]
    mc.v_head_dim = cfg["v_head_dim"]
    # v2 always rotates interleaved pairs (complex form); v3 says so in rope_interleave (default True)
    mc.rope_interleave = mc.family == "deepseek_v2" or bool(cfg.get("rope_interleave", True))
    mc.head_dim = mc.v_head_dim
    mc.num_kv_heads = mc.num_heads


def _deepseek_experts(mc: ModelConfig, cfg: dict) -> None:
    """Routed + shared experts, grouped top-k; dense until first_k_dense_replace, then every moe_layer_freq-th."""
    mc.num_experts = cfg.get("n_routed_experts") or 0
    mc.num_experts_per_tok = cfg.get("num_experts_per_tok") or 0
    mc.moe_intermediate_size = cfg.get("moe_intermediate_size", 0)
    mc.shared_expert_intermediate_size = (cfg.get("n_shared_experts") or 0) * mc.moe_intermediate_size
    mc.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
    mc.n_group = cfg.get("n_group") or 1
    mc.topk_group = cfg.get("topk_group") or 1
    mc.routed_scaling_factor = float(cfg.get("routed_scaling_factor", 1.0))
    mc.router = "sigmoid" if mc.family == "deepseek_v3" else "softmax"
    if mc.family == "deepseek_v2" and cfg.get("topk_method", "greedy") == "greedy":
        mc.n_group = mc.topk_group = 1  # plain top-k over all experts
    first_dense = cfg.get("first_k_dense_replace", 0)
    freq = cfg.get("moe_layer_freq", 1) or 1
    mc.moe_layers = tuple(mc.num_experts > 0 and i >= first_dense and i % freq == 0 for i in range(mc.num_layers))


def _phi_plain_attention(mc: ModelConfig, cfg: dict) -> None:
    if cfg.get("qk_layernorm"):
        raise UserError("phi models with qk_layernorm are not supported")


def _deepseek_yarn_scale(mc: ModelConfig, cfg: dict) -> None:
    """DeepSeek folds yarn's attention temperature into the softmax scale."""
    scaling = mc.rope_scaling
    if scaling and scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor", 1.0)
        m = 0.1 * scaling["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        mc.attn_scale = mc.qk_head_dim**-0.5 * m * m


_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _act(name: str) -> str:
    return _ACTIVATIONS.get(name, name)


def _legacy(cfg: dict, family: str, hidden: int, layers: int, heads: int, **fields: Any) -> ModelConfig:
    """A LayerNorm/ungated-MLP family whose config.json spells sizes its own way (gpt2, bloom, mpt)."""
    return ModelConfig(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        norm_type="layer",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        gated_mlp=False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        layer_types=(FULL,) * layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        raw=cfg,
        **fields,
    )


def _from_gpt2_dict(cfg: dict) -> ModelConfig:
    """gpt2 spells every key differently (n_embd, n_layer, ...) and has learned positions."""
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise UserError("gpt2 models with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
    d = cfg.get("n_embd", 768)
    return _legacy(
        cfg,
        "gpt2",
        d,
        cfg.get("n_layer", 12),
        cfg.get("n_head", 12),
        intermediate_size=cfg.get("n_inner") or 4 * d,
        max_position_embeddings=cfg.get("n_positions", 1024),
        hidden_act=_act(cfg.get("activation_function", "gelu_new")),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position_embedding="learned",
        attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
    )


def _from_bloom_dict(cfg: dict) -> ModelConfig:
    """bloom: ALiBi, a LayerNorm after the embedding, tanh-GELU MLP of 4x width, biases everywhere."""
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise UserError("bloom models with apply_residual_connection_post_layernorm are not supported")
    d = _first(cfg, "hidden_size", "n_embed", default=64)
    return _legacy(
        cfg,
        "bloom",
        d,
        _first(cfg, "n_layer", "num_hidden_layers", default=2),
        _first(cfg, "n_head", "num_attention_heads", default=8),
        intermediate_size=4 * d,
        max_position_embeddings=_first(cfg, "seq_length", "max_position_embeddings", default=2048),
        hidden_act="gelu_tanh",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        embedding_norm=True,
        position_embedding="alibi",
    )


def _from_mpt_dict(cfg: dict) -> ModelConfig:
    """mpt: ALiBi (alibi_bias_max), bias-free LayerNorms and projections (no_bias), exact-GELU MLP."""
    attn = cfg.get("attn_config") or {}
    if not attn.get("alibi", True) or attn.get("qk_ln") or attn.get("softmax_scale"):
        raise UserError("mpt models without ALiBi, or with qk_ln or softmax_scale set, are not supported")
    d = cfg["d_model"]
    bias = not cfg.get("no_bias", True)
    return _legacy(
        cfg,
        "mpt",
        d,
        cfg["n_layers"],
        cfg["n_heads"],
        intermediate_size=cfg.get("expansion_ratio", 4) * d,
        max_position_embeddings=cfg.get("max_seq_len", 2048),
        hidden_act="gelu",
        norm_bias=bias,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        qkv_clip=attn.get("clip_qkv"),
        position_embedding="alibi",
        alibi_max_bias=float(attn.get("alibi_bias_max", 8)),
    )


def _from_falcon_dict(cfg: dict) -> ModelConfig:
    """falcon (rotary): multi-query (7B) or grouped (new_decoder_architecture: 40B/180B) attention, attention and
    MLP in parallel from one LayerNorm (7B) or two (ln_attn, ln_mlp), no projection biases unless `bias`."""
    new_arch = bool(cfg.get("new_decoder_architecture"))
    if cfg.get("alibi") or (new_arch and not cfg.get("parallel_attn", True)):
        raise UserError(
            "falcon models with alibi, or the new decoder architecture without parallel_attn, are not supported"
        )
    heads, d = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = (cfg.get("num_kv_heads") or heads) if new_arch else (1 if cfg.get("multi_query", True) else heads)
    parallel = bool(cfg.get("parallel_attn", True))
    two_norms = not parallel or (new_arch and (cfg.get("num_ln_in_parallel_attn") or 2) == 2)
    theta, scaling, _, _ = _rope(cfg)
    bias = bool(cfg.get("bias", False))
    mc = _legacy(
        cfg,
        "falcon",
        d,
        cfg["num_hidden_layers"],
        heads,
        intermediate_size=cfg.get("ffn_hidden_size") or 4 * d,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        hidden_act=_act(cfg.get("activation", "gelu")),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        parallel_residual=parallel,
        shared_norm=parallel and not two_norms,
        rope_theta=theta,
        rope_scaling=scaling,
    )
    mc.num_kv_heads = kv
    return mc


# ---- the family table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyTraits:
    """How a family differs from a plain llama, read by from_hf_dict."""

    qk_norm: bool = False  # per-head RMSNorm on q and k
    gemma_norms: bool = False  # norms store w - 1, embeddings scaled by sqrt(hidden) and tied unless told otherwise
    sandwich_norm: bool = False  # extra norms after attention and around the MLP
    gemma2_attention: bool = False  # softmax scale from query_pre_attn_scalar, attention and final logit softcaps
    local_rope: bool = False  # sliding layers use rope_local_base_freq
    layer_norm: bool = False  # LayerNorm with bias, ungated MLP, parallel residual (use_parallel_residual)
    shared_norm: bool = False  # one LayerNorm per layer feeds attention and MLP (phi)
    lm_head_bias: bool = False
    biases: Callable[[dict], tuple[bool, bool, bool]] = _attention_bias
    window: str = "config"  # "config": sliding_window as given; "opt_in": only with use_sliding_window; "never"
    window_layers: WindowRule = _all_sliding
    readers: tuple[Callable[[ModelConfig, dict], None], ...] = ()  # experts, latent attention: run in order
    build: Callable[[dict], ModelConfig] | None = None  # a config whose keys are not llama's at all


_QWEN_WINDOW = dict(window="opt_in", window_layers=_qwen_window_layers)

# In the order the unknown-family error lists them.
FAMILIES: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(),
    "mistral": FamilyTraits(),
    "mixtral": FamilyTraits(readers=(_mixtral_experts,)),
    "qwen2": FamilyTraits(biases=_qwen2_bias, **_QWEN_WINDOW),
    "qwen2_moe": FamilyTraits(biases=_qwen2_bias, readers=(_qwen_moe_experts, _qwen2_shared_expert), **_QWEN_WINDOW),
    "qwen3": FamilyTraits(qk_norm=True, **_QWEN_WINDOW),
    "qwen3_moe": FamilyTraits(qk_norm=True, readers=(_qwen_moe_experts,), **_QWEN_WINDOW),
    "gemma": FamilyTraits(gemma_norms=True, window="never"),
    "gemma2": FamilyTraits(
        gemma_norms=True, sandwich_norm=True, gemma2_attention=True, window_layers=_even_layers_slide
    ),
    "gemma3": FamilyTraits(
        qk_norm=True,
        gemma_norms=True,
        sandwich_norm=True,
        gemma2_attention=True,
        local_rope=True,
        window_layers=_gemma3_pattern,
    ),
    "phi3": FamilyTraits(),
    "gpt2": FamilyTraits(build=_from_gpt2_dict),
    "gpt_neox": FamilyTraits(layer_norm=True, biases=_neox_bias),
    "phi": FamilyTraits(
        layer_norm=True, shared_norm=True, lm_head_bias=True, biases=_all_bias, readers=(_phi_plain_attention,)
    ),
    "bloom": FamilyTraits(build=_from_bloom_dict),
    "mpt": FamilyTraits(build=_from_mpt_dict),
    "falcon": FamilyTraits(build=_from_falcon_dict),
    "deepseek_v2": FamilyTraits(readers=(_deepseek_mla, _deepseek_experts, _deepseek_yarn_scale)),
    "deepseek_v3": FamilyTraits(readers=(_deepseek_mla, _deepseek_experts, _deepseek_yarn_scale)),
}
# Other names a family goes by: transformers calls gemma3's text tower gemma3_text.
ALIASES = {"gemma3_text": "gemma3"}
SUPPORTED_FAMILIES = (*FAMILIES, *ALIASES)


def from_hf_dict(cfg: dict) -> ModelConfig:
    """Normalize a transformers config.json dict. Raises UserError for unknown families."""
    family = cfg.get("model_type")
    if family == "gemma3" and "text_config" in cfg:  # multimodal wrapper: we run the text tower
        inner = dict(cfg["text_config"])
        inner.setdefault("model_type", "gemma3_text")
        for k in ("eos_token_id", "bos_token_id", "torch_dtype"):
            inner.setdefault(k, cfg.get(k))
        return from_hf_dict(inner)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"unsupported model family {family!r}; supported: {', '.join(FAMILIES)}")
    family = ALIASES.get(family, family)
    traits = FAMILIES[family]
    if traits.build is not None:
        return traits.build(cfg)
    mc = _dense_config(cfg, family, traits)
    for read in traits.readers:
        read(mc, cfg)
    if not mc.moe_layers:
        mc.moe_layers = (False,) * mc.num_layers
    return mc


def _dense_config(cfg: dict, family: str, traits: FamilyTraits) -> ModelConfig:
    """The ModelConfig of the llama-style keys, with the family's traits applied."""
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    n = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // heads
    theta, scaling, local_theta, partial = _rope(cfg)
    act = _act(_first(cfg, "hidden_activation", "hidden_act", default="silu"))
    window = cfg.get("sliding_window") or None
    if traits.window == "never" or (traits.window == "opt_in" and not cfg.get("use_sliding_window", False)):
        window = None
    qkv_bias, o_bias, mlp_bias = traits.biases(cfg)
    mc = ModelConfig(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", 4 * hidden),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_type="layer" if traits.layer_norm else "rms",
        norm_eps=_first(cfg, "rms_norm_eps", "layer_norm_eps", default=1e-6),
        norm_offset=1.0 if traits.gemma_norms else 0.0,
        hidden_act=act,
        gated_mlp=not traits.layer_norm,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=traits.qk_norm,
        sandwich_norm=traits.sandwich_norm,
        parallel_residual=traits.layer_norm and bool(cfg.get("use_parallel_residual", True)),
        shared_norm=traits.shared_norm,
        lm_head_bias=traits.lm_head_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", traits.gemma_norms)),
        embedding_scale=math.sqrt(hidden) if traits.gemma_norms else None,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=float(local_theta or 10000.0) if traits.local_rope else None,
        partial_rotary_factor=partial,
        original_max_position_embeddings=cfg.get("original_max_position_embeddings"),
        sliding_window=window,
        layer_types=_layer_types(cfg, traits.window_layers, n, window),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        raw=cfg,
    )
    if traits.gemma2_attention:
        mc.attn_scale = cfg.get("query_pre_attn_scalar", head_dim) ** -0.5
        mc.attn_logit_softcap = cfg.get("attn_logit_softcapping")
        mc.final_logit_softcap = cfg.get("final_logit_softcapping")
    return mc


def load_config(path: str | Path) -> ModelConfig:
    """Read a config.json file (or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"no config.json at {p}")
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UserError(f"{p} has no model_type: not a transformers config.json")
    try:
        return check_sizes(from_hf_dict(cfg), p)
    except KeyError as e:
        raise UserError(f"{p} lacks the field {e.args[0]!r} needed for a {cfg.get('model_type')} model") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # e.g. "hidden_size": "64", or 0 heads
        kind = cfg.get("model_type")
        raise UserError(f"{p} has a field of the wrong type or value for a {kind} model ({e})") from None


_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings")


def check_sizes(config: ModelConfig, source: str | Path) -> ModelConfig:
    """config, or UserError naming source when a size the model is built from is not a positive integer (a
    corrupt or hand-edited config: "hidden_size": "64", 0 heads, -1 layers) or the heads do not group evenly."""
    for name in (*_SIZES, "intermediate_size"):
        v = getattr(config, name)
        least = 0 if name == "intermediate_size" else 1  # MoE models may have no dense MLP
        if type(v) is not int or v < least:
            raise UserError(f"{source}: {name} is {v!r}; it must be an integer of at least {least}")
    if config.num_heads % config.num_kv_heads:
        raise UserError(
            f"{source}: {config.num_heads} attention heads do not split into {config.num_kv_heads} key/value heads"
        )
    return config
