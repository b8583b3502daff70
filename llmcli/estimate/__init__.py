"""Exact sizing of a model from its ModelConfig alone: parameters, weight memory, KV cache, FLOPs, GPU fit.

Everything derives from one inventory, `param_groups(cfg)`: every parameter tensor the transformers model
of that family has, grouped by identical shape, with how many of each a token actually uses (MoE) and what
role it plays (a decoder-layer matmul the quantizer packs, an embedding, a norm/bias vector, a router).
Counting, memory per dtype and FLOPs are then one pass over that inventory, so they cannot disagree.
No torch here: these are plain integer formulas and run instantly for 671B models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llmcli.config import ModelConfig
from llmcli.estimate.gpus import GIB

WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "int8", "int4", "nf4")
KV_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# int8/fp8 KV as the engine caches it (llmcli/layers/kv_cache.py): 1-byte codes plus a float16 scale per token
# and (K or V, KV head)
KV_SCALED = ("int8", "fp8")
KV_SCALE_BYTES = 2

# Activation/workspace model (see activation_bytes): prompts are prefilled in chunks of at most this many
# tokens (summed over the batch), so prefill buffers stop growing with the context past it.
PREFILL_CHUNK = 2048
# nf4 (bitsandbytes, blocksize 64, double quant): per quantized matrix a 16-entry fp32 NF4 code,
# a 256-entry fp32 code for the 8-bit absmax and one fp32 offset.
NF4_TENSOR_OVERHEAD = 16 * 4 + 256 * 4 + 4
# GPU memory a model cannot use: CUDA context, cuBLAS workspaces, allocator slack.
RUNTIME_RESERVE = GIB


@dataclass(frozen=True)
class Weights:
    """`count` parameter tensors of one shape; a token touches `active` of them."""

    name: str
    shape: tuple[int, ...]  # (out, in) for matrices, (n,) for vectors
    count: int
    role: str  # "linear" (quantizable decoder matmul) | "router" | "vector" | "embedding" | "lm_head"
    active: int = -1  # -1: all of them

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total(self) -> int:
        return self.numel * self.count

    @property
    def used(self) -> int:
        return self.numel * (self.count if self.active < 0 else self.active)


# ---- the inventory ------------------------------------------------------------------------------------------


def _linear(
    out: list[Weights],
    name: str,
    n_in: int,
    n_out: int,
    bias: bool,
    count: int = 1,
    active: int = -1,
    role: str = "linear",
) -> None:
    out.append(Weights(name, (n_out, n_in), count, role, active))
    if bias:
        out.append(Weights(name + ".bias", (n_out,), count, "vector", active))


def _norm(cfg: ModelConfig, out: list[Weights], name: str, n: int) -> None:
    out.append(Weights(name, (n,), 1, "vector"))
    if cfg.norm_type == "layer" and cfg.norm_bias:  # LayerNorm carries a bias too (not mpt's)
        out.append(Weights(name + ".bias", (n,), 1, "vector"))


def _attention(cfg: ModelConfig, out: list[Weights]) -> None:
    d = cfg.hidden_size
    if cfg.is_mla:
        h, qk = cfg.num_heads, cfg.qk_head_dim
        if cfg.q_lora_rank:  # queries through a low-rank bottleneck with its own norm
            _linear(out, "q_a_proj", d, cfg.q_lora_rank, cfg.qkv_bias)
            _norm(cfg, out, "q_a_layernorm", cfg.q_lora_rank)
            _linear(out, "q_b_proj", cfg.q_lora_rank, h * qk, False)
        else:
            _linear(out, "q_proj", d, h * qk, False)
        _linear(out, "kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qkv_bias)
        _norm(cfg, out, "kv_a_layernorm", cfg.kv_lora_rank)
        _linear(out, "kv_b_proj", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), False)
        _linear(out, "o_proj", h * cfg.v_head_dim, d, cfg.o_bias)
        return
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    _linear(out, "q_proj", d, q, cfg.qkv_bias)
    _linear(out, "k_proj", d, kv, cfg.qkv_bias)
    _linear(out, "v_proj", d, kv, cfg.qkv_bias)
    _linear(out, "o_proj", q, d, cfg.o_bias)
    if cfg.qk_norm:  # one RMSNorm over head_dim, shared by all heads
        _norm(cfg, out, "q_norm", cfg.head_dim)
        _norm(cfg, out, "k_norm", cfg.head_dim)


def _mlp(
    cfg: ModelConfig, out: list[Weights], prefix: str, width: int, count: int = 1, active: int = -1, bias: bool = False
) -> None:
    d = cfg.hidden_size
    if cfg.gated_mlp:
        _linear(out, prefix + "gate_proj", d, width, bias, count, active)
        _linear(out, prefix + "up_proj", d, width, bias, count, active)
    else:
        _linear(out, prefix + "up_proj", d, width, bias, count, active)
    _linear(out, prefix + "down_proj", width, d, bias, count, active)


def _layer(cfg: ModelConfig, i: int) -> list[Weights]:
    out: list[Weights] = []
    d = cfg.hidden_size
    norms = ["input_layernorm"] if cfg.shared_norm else ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norm:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for n in norms:
        _norm(cfg, out, n, d)
    _attention(cfg, out)
    if not cfg.is_moe_layer(i):
        _mlp(cfg, out, "mlp.", cfg.intermediate_size, bias=cfg.mlp_bias)
        return out
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    _linear(out, "router", d, e, False, role="router")
    _mlp(cfg, out, "experts.", cfg.moe_intermediate_size, count=e, active=k)
    if cfg.shared_expert_intermediate_size:
        _mlp(cfg, out, "shared_expert.", cfg.shared_expert_intermediate_size)
    if cfg.shared_expert_gate or cfg.family == "qwen2_moe":  # transformers builds qwen2_moe's gate even unused
        _linear(out, "shared_expert_gate", d, 1, False, role="router")
    return out


def param_groups(cfg: ModelConfig) -> list[Weights]:
    """Every parameter tensor of the model, identical decoder layers merged (count multiplied)."""
    d = cfg.hidden_size
    groups: list[Weights] = [Weights("embed_tokens", (cfg.vocab_size, d), 1, "embedding")]
    if cfg.position_embedding == "learned":
        groups.append(Weights("embed_positions", (cfg.max_position_embeddings, d), 1, "embedding"))
    if cfg.embedding_norm:
        _norm(cfg, groups, "embed_layernorm", d)
    merged: dict[tuple, int] = {}
    for i in range(cfg.num_layers):
        for w in _layer(cfg, i):
            key = (w.name, w.shape, w.role, w.count, w.active)
            merged[key] = merged.get(key, 0) + 1
    for (name, shape, role, count, active), layers in merged.items():
        groups.append(Weights("layers." + name, shape, count * layers, role, -1 if active < 0 else active * layers))
    norm = []
    _norm(cfg, norm, "norm", d)
    groups += norm
    if not cfg.tie_word_embeddings:
        groups.append(Weights("lm_head", (cfg.vocab_size, d), 1, "lm_head"))
    if cfg.lm_head_bias:
        groups.append(Weights("lm_head.bias", (cfg.vocab_size,), 1, "vector"))
    return groups


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # per token: MoE layers count only the k routed experts a token goes to
    embedding: int  # token (+ position) embeddings and an untied lm_head
    non_embedding: int


def count_params(cfg: ModelConfig) -> ParamCount:
    groups = param_groups(cfg)
    total = sum(w.total for w in groups)
    emb = sum(w.total for w in groups if w.role in ("embedding", "lm_head"))
    return ParamCount(total, sum(w.used for w in groups), emb, total - emb)


# ---- weight memory ------------------------------------------------------------------------------------------


def effective_group_size(in_features: int, group_size: int) -> int:
    """Same rule as llmcli.quant.int4: the requested group size, else the largest smaller power of two
    (>= 16) dividing the input size, else one group per row."""
    g = group_size
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return in_features


def matrix_bytes(out_f: int, in_f: int, dtype: str, group_size: int = 128) -> int:
    """Bytes of one [out, in] weight matrix stored as `dtype`, scales and zeros included."""
    n = out_f * in_f
    if dtype in BYTES:
        return n * BYTES[dtype]
    if dtype == "int8":  # int8 values + one fp16 scale per output row
        return n + 2 * out_f
    if dtype == "int4":  # two values per byte + fp16 scale and fp16 zero per group of each row
        g = effective_group_size(in_f, group_size)
        return n // 2 + out_f * (in_f // g) * 4
    if dtype == "nf4":  # bitsandbytes: 4-bit values, uint8 absmax per 64 values, fp32 absmax per 256 blocks
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + NF4_TENSOR_OVERHEAD
    raise ValueError(f"unknown weight dtype {dtype!r}")


def quantizable(w: Weights, dtype: str, quantize_embeddings: bool) -> bool:
    if w.role == "lm_head" or (w.role == "embedding" and w.name == "embed_tokens"):
        if not quantize_embeddings:  # token table and head: packed (per row) only with --quantize-embeddings
            return False
    elif w.role != "linear" or w.shape[0] < 2:
        return False
    if dtype == "nf4" and w.name.startswith("layers.experts."):
        return False  # bitsandbytes has no stacked-expert layout: `llm quantize --method nf4` keeps experts 16-bit
    if dtype == "int4" and w.name.startswith("layers.experts.") and w.shape[0] % 2:
        return False  # a block's experts pack together: an odd hidden size or expert width keeps all 16-bit
    return not (dtype in ("int4",) and w.shape[1] % 2)  # int4 packs two input columns per byte


def weight_bytes(
    cfg: ModelConfig, dtype: str = "bf16", group_size: int = 128, quantize_embeddings: bool = False
) -> int:
    """Bytes of all weights. For int8/int4/nf4 only decoder-layer matmuls are packed (what `llm quantize`
    does); embeddings, lm_head, norms, biases and routers stay 16-bit. quantize_embeddings packs the token
    embedding and lm_head too (a tied model stores its one table once, as the checkpoint writer does)."""
    if dtype in BYTES:
        return sum(w.total for w in param_groups(cfg)) * BYTES[dtype]
    total = 0
    for w in param_groups(cfg):
        if quantizable(w, dtype, quantize_embeddings):
            total += w.count * matrix_bytes(w.shape[0], w.shape[1], dtype, group_size)
        else:
            total += w.total * 2
    return total


def checkpoint_quantization(cfg: ModelConfig) -> tuple[str | None, int | None, bool]:
    """(dtype, group size, quantize_embeddings) a checkpoint's quantization_config implies; None: not quantized."""
    qc = cfg.raw.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return "nf4", None, False
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return "int8", None, False
    elif method in ("llmcli", "gptq", "awq") and qc.get("bits") in (4, 8):
        if qc.get("method") == "nf4":
            return "nf4", None, False
        return ("int8" if qc["bits"] == 8 else "int4"), qc.get("group_size"), bool(qc.get("quantize_embeddings"))
    return None, None, False


# ---- KV cache -----------------------------------------------------------------------------------------------


KV_BLOCK_SIZE = 16  # tokens per block of the engine's paged KV cache (its default block_size)


def kv_layer_bytes(cfg: ModelConfig, i: int, kv_dtype: str | int = "bf16") -> int:
    """Cache bytes one token adds to layer i: its values at the dtype's width, plus int8/fp8's scales.

    kv_dtype: a name from KV_DTYPES, or the bytes of one cached value of an unscaled float cache."""
    if isinstance(kv_dtype, int):
        return cfg.kv_values_per_token(i) * kv_dtype
    if kv_dtype in KV_SCALED:
        return cfg.kv_values_per_token(i) + cfg.kv_cache_groups(i) * KV_SCALE_BYTES
    return cfg.kv_values_per_token(i) * BYTES[kv_dtype]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str | int = "bf16") -> int:
    """Cache bytes one token adds to every layer (context shorter than any window)."""
    return sum(kv_layer_bytes(cfg, i, kv_dtype) for i in range(cfg.num_layers))


def kv_blocks(context: int, window: int | None, block_size: int = KV_BLOCK_SIZE) -> int:
    """Blocks of block_size tokens the engine's paged cache holds in a layer for a sequence of `context` cached
    tokens: all ceil(context / block_size) for full attention; for a sliding window w, those from the block
    holding position context - w + 1 (the oldest key the next token sees) to the last, which is at most
    ceil((w + block_size - 2) / block_size). While a step computes c more tokens the layer holds
    kv_blocks(context + c, w + c) (the chunk's own keys), one more block at most for a decode step."""
    n = -(-context // block_size)
    if window is None:
        return n
    return n - max(0, context - window + 1) // block_size


def kv_blocks_max(window: int, block_size: int = KV_BLOCK_SIZE) -> int:
    """The most blocks kv_blocks(context, window) reaches at any context: ceil((window + block_size - 2) /
    block_size)."""
    return -(-(window + block_size - 2) // block_size)


def kv_bytes(cfg: ModelConfig, context: int, batch: int = 1, kv_dtype: str = "bf16") -> int:
    """Cache for `batch` sequences of `context` tokens, counted in the engine's blocks (kv_blocks): a
    sliding-window layer keeps only the blocks its window still sees."""
    total = 0
    for i in range(cfg.num_layers):
        total += kv_layer_bytes(cfg, i, kv_dtype) * kv_blocks(context, cfg.layer_window(i)) * KV_BLOCK_SIZE
    return total * batch


# ---- FLOPs --------------------------------------------------------------------------------------------------


def matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies with: active decoder matmuls, routers and the lm_head (tied or not)."""
    groups = param_groups(cfg)
    return sum(w.used for w in groups if w.role in ("linear", "router", "lm_head")) + (
        cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0
    )


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """Scores (q.k) and the weighted sum of values for one new token over `context` cached tokens."""
    if cfg.is_mla:  # per head: q.k over qk_nope+qk_rope dims, then a v_head_dim weighted sum
        per_pos = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        per_pos = 2 * cfg.num_heads * cfg.head_dim
    total = 0
    for i in range(cfg.num_layers):
        w = cfg.layer_window(i)
        total += per_pos * (min(context, w) if w else context)
    return 2 * total


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs for one token at position `context`: 2 per multiply-add of every active weight,
    plus the attention over the (window-limited) context."""
    return 2 * matmul_params(cfg) + attention_flops(cfg, context)


# ---- activations / workspace --------------------------------------------------------------------------------


def activation_bytes(cfg: ModelConfig, context: int, batch: int = 1, act_bytes: int = 2) -> int:
    """Peak transient memory of one forward step (a documented estimate, not a measurement).

    T = min(batch * context, PREFILL_CHUNK) tokens go through a layer at once during chunked prefill:
      hidden   4 * T * hidden            residual, normed input, attention output, MLP output
      qkv      T * (q + k + v widths)    MLA: queries plus the decompressed keys and values
      mlp      3 * T * width             gate, up and their product; MoE: each token's k experts + shared
      logits   batch * vocab * 4         fp32 logits of each sequence's last position
    Attention scores are not materialized (fused SDPA/flash kernels), so no T x context term.
    """
    t = min(batch * context, PREFILL_CHUNK)
    if cfg.is_mla:
        qkv = cfg.num_heads * (2 * cfg.qk_head_dim + cfg.v_head_dim)
    else:
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    width = max(  # the widest MLP any layer runs: dense, or each token's k experts plus the shared expert
        cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size
        if cfg.is_moe_layer(i)
        else cfg.intermediate_size
        for i in range(cfg.num_layers)
    )
    per_token = 4 * cfg.hidden_size + qkv + 3 * width
    return t * per_token * act_bytes + batch * cfg.vocab_size * 4


# ---- the whole estimate and the GPU fit ---------------------------------------------------------------------


@dataclass
class Options:
    dtype: str = "bf16"
    group_size: int = 128
    quantize_embeddings: bool = False
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "bf16"
    gpu_bytes: int | None = None  # None: no fit questions
    # The checkpoint's weights as stored (a GGUF's tensors, from its header), used instead of the dtype formula;
    # dtype is then only its label (e.g. "q4_1").
    stored_weight_bytes: int | None = None

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


def option_weight_bytes(cfg: ModelConfig, opts: Options) -> int:
    """Bytes of the weights opts describes: the stored size when known, else weight_bytes for opts.dtype."""
    if opts.stored_weight_bytes is not None:
        return opts.stored_weight_bytes
    return weight_bytes(cfg, opts.dtype, opts.group_size, opts.quantize_embeddings)


def total_bytes(cfg: ModelConfig, opts: Options, context: int, batch: int, weights: int | None = None) -> int:
    w = option_weight_bytes(cfg, opts) if weights is None else weights
    return w + kv_bytes(cfg, context, batch, opts.kv_dtype) + activation_bytes(cfg, context, batch, opts.act_bytes)


def usable_bytes(gpu_bytes: int) -> int:
    """What a model can use of a GPU: total minus the runtime reserve (at most a tenth of small cards)."""
    return gpu_bytes - min(RUNTIME_RESERVE, gpu_bytes // 10)


def max_context(cfg: ModelConfig, opts: Options, budget: int) -> int:
    """Largest context (<= the model's max_position_embeddings) whose total fits `budget` at opts.batch;
    0 if not even one token fits. total() is non-decreasing in context, so bisection is exact."""
    w = option_weight_bytes(cfg, opts)
    fits = lambda c: total_bytes(cfg, opts, c, opts.batch, w) <= budget  # noqa: E731
    lo, hi = 0, cfg.max_position_embeddings
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch(cfg: ModelConfig, opts: Options, budget: int) -> int:
    """Largest batch of opts.context-token sequences that fits `budget` (0: none). Every layer caches
    something per token, so memory grows without bound in the batch: double, then bisect."""
    w = option_weight_bytes(cfg, opts)
    fits = lambda b: total_bytes(cfg, opts, opts.context, b, w) <= budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class Estimate:
    family: str
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    params_total: int
    params_active: int
    params_embedding: int
    params_non_embedding: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    activation_bytes: int
    total_bytes: int
    flops_per_token: int
    group_size: int | None = None
    gpu_bytes: int | None = None
    usable_bytes: int | None = None
    fits: bool | None = None
    max_context: int | None = None
    max_batch: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def estimate(cfg: ModelConfig, opts: Options) -> Estimate:
    pc = count_params(cfg)
    wb = option_weight_bytes(cfg, opts)
    kv = kv_bytes(cfg, opts.context, opts.batch, opts.kv_dtype)
    act = activation_bytes(cfg, opts.context, opts.batch, opts.act_bytes)
    est = Estimate(
        family=cfg.family,
        dtype=opts.dtype,
        kv_dtype=opts.kv_dtype,
        context=opts.context,
        batch=opts.batch,
        params_total=pc.total,
        params_active=pc.active,
        params_embedding=pc.embedding,
        params_non_embedding=pc.non_embedding,
        weight_bytes=wb,
        kv_bytes_per_token=kv_bytes_per_token(cfg, opts.kv_dtype),
        kv_bytes=kv,
        activation_bytes=act,
        total_bytes=wb + kv + act,
        flops_per_token=flops_per_token(cfg, opts.context),
        group_size=opts.group_size if opts.dtype == "int4" else None,
    )
    if opts.gpu_bytes is not None:
        budget = usable_bytes(opts.gpu_bytes)
        est.gpu_bytes, est.usable_bytes = opts.gpu_bytes, budget
        est.fits = est.total_bytes <= budget
        est.max_context = max_context(cfg, opts, budget)
        est.max_batch = max_batch(cfg, opts, budget)
    return est
