"""`llm estimate --explain`: every formula of the estimate with the model's numbers plugged in.

Beside each exact value: the textbook rule of thumb (12*L*d^2, 2*N, 2*L*d per token ...) and why this
model departs from it (GQA, MLA, gated or MoE MLPs, a large vocabulary, sliding windows).
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.estimate import (
    BYTES,
    PREFILL_CHUNK,
    Estimate,
    Options,
    attention_flops,
    matmul_params,
    param_groups,
    quantizable,
)
from llmcli.units import format_bytes, format_count


def _n(x: float) -> str:
    """A count as the explanation writes it: 8.03B, 134.5M, 576."""
    return format_count(x, significant=True)


def _b(x: float) -> str:
    """A size as the explanation writes it: 256.57 MiB."""
    return format_bytes(x, binary=True)


def _off(actual: float, rule: float) -> str:
    if actual == 0:
        return "n/a"
    r = rule / actual
    return f"rule of thumb is {r:.2f}x the exact value ({(r - 1) * 100:+.0f}%)"


def explain(cfg: ModelConfig, opts: Options, est: Estimate) -> list[str]:
    """Each formula with this model's numbers plugged in, beside the rule of thumb and why it is off."""
    return (
        _parameters(cfg, est)
        + _weights(cfg, opts, est)
        + _kv_cache(cfg, opts, est)
        + _flops(cfg, opts, est)
        + _totals(opts, est)
    )


def _parameters(c: ModelConfig, est: Estimate) -> list[str]:
    L, d, V = c.num_layers, c.hidden_size, c.vocab_size
    groups = param_groups(c)
    by_role = lambda *roles: sum(w.total for w in groups if w.role in roles)  # noqa: E731
    attn_names = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    attn = sum(w.total for w in groups if w.role == "linear" and w.name.split(".")[-1] in attn_names)
    mlp = by_role("linear") - attn
    lines = ["PARAMETERS"]
    emb = f"V*d = {V}*{d} = {_n(V * d)}"
    if c.position_embedding == "learned":
        emb += f" + positions {c.max_position_embeddings}*{d}"
    if not c.tie_word_embeddings:
        emb += f" + untied lm_head {_n(V * d)}"
    lines.append(f"  embeddings       {emb} -> {_n(est.params_embedding)}")
    if c.is_mla:
        q = (
            f"d*q_lora + q_lora*H*(nope+rope) = {d}*{c.q_lora_rank} + {c.q_lora_rank}*{c.num_heads}*{c.qk_head_dim}"
            if c.q_lora_rank
            else f"d*H*(nope+rope) = {d}*{c.num_heads}*{c.qk_head_dim}"
        )
        lines.append(f"  attention (MLA)  L*[{q} + d*(kv_lora+rope) + kv_lora*H*(nope+v) + H*v*d] -> {_n(attn)}")
    else:
        lines.append(
            f"  attention        L*d*(2*H + 2*KV)*head_dim = {L}*{d}*(2*{c.num_heads} + 2*{c.num_kv_heads})*"
            f"{c.head_dim} -> {_n(attn)}"
        )
    mats = 3 if c.gated_mlp else 2
    if c.is_moe:
        n_moe = sum(c.moe_layers)
        lines.append(
            f"  MLP / experts    {L - n_moe} dense layers*{mats}*d*{c.intermediate_size} + {n_moe} MoE layers*"
            f"({c.num_experts} experts*{mats}*d*{c.moe_intermediate_size}"
            + (f" + shared {mats}*d*{c.shared_expert_intermediate_size}" if c.shared_expert_intermediate_size else "")
            + f") -> {_n(mlp)}"
        )
    else:
        lines.append(f"  MLP              L*{mats}*d*intermediate = {L}*{mats}*{d}*{c.intermediate_size} -> {_n(mlp)}")
    lines.append(f"  norms/biases/routers                                -> {_n(by_role('vector', 'router'))}")
    lines.append(
        f"  total {est.params_total:,}  (non-embedding {est.params_non_embedding:,}"
        + (f"; active per token {est.params_active:,})" if c.is_moe else ")")
    )
    rule = 12 * L * d * d
    lines.append(
        f"  rule of thumb    12*L*d^2 = 12*{L}*{d}^2 = {_n(rule)} non-embedding: {_off(est.params_non_embedding, rule)}"
    )
    lines += [f"    - {w}" for w in _parameter_departures(c, est, attn)]
    return lines


def _parameter_departures(c: ModelConfig, est: Estimate, attn: int) -> list[str]:
    """Why this model's parameter count is not 12*L*d^2."""
    L, d = c.num_layers, c.hidden_size
    why = []
    if c.num_kv_heads != c.num_heads and not c.is_mla:
        why.append(
            f"GQA: k/v have {c.num_kv_heads} of {c.num_heads} heads, so attention is "
            f"{_n(attn / L)}/layer, not 4*d^2 = {_n(4 * d * d)}"
        )
    if c.num_heads * c.head_dim != d and not c.is_mla:
        why.append(f"head_dim*H = {c.head_dim}*{c.num_heads} = {c.head_dim * c.num_heads} != d = {d}")
    if c.is_mla:
        why.append(f"MLA: low-rank q/kv projections give {_n(attn / L)}/layer, not 4*d^2 = {_n(4 * d * d)}")
    if c.gated_mlp and not c.is_moe:
        why.append(
            f"gated MLP: 3 matrices of width {c.intermediate_size} ({c.intermediate_size / d:.2f}*d) = "
            f"{3 * c.intermediate_size / d:.1f}*d^2, not 8*d^2"
        )
    elif not c.is_moe and c.intermediate_size != 4 * d:
        why.append(f"MLP width {c.intermediate_size} is {c.intermediate_size / d:.2f}*d, not 4*d")
    if c.is_moe:
        why.append(
            f"MoE: {c.num_experts} experts per MoE layer, {c.num_experts_per_tok} used per token "
            f"(active {_n(est.params_active)} of {_n(est.params_total)})"
        )
    if est.params_embedding > 0.1 * est.params_total:
        why.append(
            f"vocab: embeddings are {100 * est.params_embedding / est.params_total:.0f}% of all parameters "
            "and are not in 12*L*d^2"
        )
    return why


def _weights(c: ModelConfig, opts: Options, est: Estimate) -> list[str]:
    lines = ["WEIGHTS"]
    if opts.stored_weight_bytes is not None:
        lines.append(f"  the checkpoint's tensors as stored ({opts.dtype}): {_b(est.weight_bytes)}")
    elif opts.dtype in BYTES:
        lines.append(f"  params*bytes = {est.params_total:,}*{BYTES[opts.dtype]} = {_b(est.weight_bytes)}")
    else:
        packed = sum(w.total for w in param_groups(c) if quantizable(w, opts.dtype, opts.quantize_embeddings))
        rest = est.params_total - packed
        qb = est.weight_bytes - 2 * rest
        how = {
            "int8": "1 byte + fp16 scale per output row",
            "int4": f"4 bits + fp16 scale and zero per group of {opts.group_size} (largest divisor if it does not "
            "divide the input size)",
            "nf4": "4 bits + uint8 absmax per 64 + fp32 absmax per 256 blocks (bitsandbytes double quant)",
        }[opts.dtype]
        lines.append(
            f"  {_n(packed)} decoder matmul weights as {opts.dtype} ({how}): {_b(qb)} = "
            f"{8 * qb / max(packed, 1):.3f} bits/weight"
        )
        lines.append(f"  {_n(rest)} embedding/lm_head/norm/bias/router weights kept 16-bit: {_b(2 * rest)}")
        lines.append(
            f"  total {_b(est.weight_bytes)}; rule of thumb params*bits/8 = "
            f"{_b(est.params_total * (8 if opts.dtype == 'int8' else 4) / 8)}"
        )
    return lines


def _kv_cache(c: ModelConfig, opts: Options, est: Estimate) -> list[str]:
    L, d = c.num_layers, c.hidden_size
    kvb = BYTES.get(opts.kv_dtype, 1)  # int8: 1 byte a value (its scales are in the per-token total)
    lines = ["KV CACHE"]
    if c.is_mla:
        lines.append(
            f"  per token = L*(kv_lora + rope)*bytes = {L}*({c.kv_lora_rank} + {c.qk_rope_head_dim})*{kvb} = "
            f"{_b(est.kv_bytes_per_token)}"
        )
    else:
        lines.append(
            f"  per token = L*2*KV*head_dim*bytes = {L}*2*{c.num_kv_heads}*{c.head_dim}*{kvb} = "
            f"{_b(est.kv_bytes_per_token)}"
        )
    naive_tok = 2 * L * d * kvb
    lines.append(
        f"  rule of thumb 2*L*d*bytes = 2*{L}*{d}*{kvb} = {_b(naive_tok)} per token: "
        f"{_off(est.kv_bytes_per_token, naive_tok)}"
    )
    why = []
    if c.is_mla:
        why.append(
            f"MLA caches one {c.kv_lora_rank}-dim latent + a {c.qk_rope_head_dim}-dim rope key per layer "
            f"instead of K and V for {c.num_heads} heads"
        )
    elif c.num_kv_heads != c.num_heads:
        why.append(
            f"GQA: {c.num_kv_heads} KV heads for {c.num_heads} query heads ({c.num_heads // c.num_kv_heads}x fewer)"
        )
    if not c.is_mla and c.num_heads * c.head_dim != d:
        why.append(f"head_dim*H = {c.num_heads * c.head_dim} != d = {d}")
    lines += [f"    - {w}" for w in why]
    windows = sorted({c.layer_window(i) for i in range(L)} - {None})
    full_layers = sum(1 for i in range(L) if c.layer_window(i) is None)
    terms = [f"{full_layers} full layers*{opts.context}"] if full_layers else []
    for w in windows:
        n = sum(1 for i in range(L) if c.layer_window(i) == w)
        terms.append(f"{n} window layers*min({opts.context}, {w})")
    lines.append(
        f"  for context {opts.context}, batch {opts.batch}: per-layer values*({' + '.join(terms)})*batch*bytes"
        f" = {_b(est.kv_bytes)}"
    )
    naive = naive_tok * opts.context * opts.batch
    lines.append(f"  rule of thumb 2*L*d*seq*batch*bytes = {_b(naive)}: {_off(est.kv_bytes, naive)}")
    if windows and opts.context > min(windows):
        lines.append(f"    - sliding windows ({', '.join(map(str, windows))} tokens) cap what those layers keep")
    return lines


def _flops(c: ModelConfig, opts: Options, est: Estimate) -> list[str]:
    lines = ["FLOPS PER TOKEN"]
    mm = matmul_params(c)
    att = attention_flops(c, opts.context)
    lines.append(
        f"  2*active matmul weights (incl. lm_head) + attention = 2*{_n(mm)} + {_n(att)} = {_n(est.flops_per_token)}"
    )
    per_pos = (
        f"H*(qk_dim+v_dim) = {c.num_heads}*({c.qk_head_dim}+{c.v_head_dim})"
        if c.is_mla
        else f"2*H*head_dim = 2*{c.num_heads}*{c.head_dim}"
    )
    lines.append(f"  attention = 2 * sum over layers of {per_pos} * min(context, window), at context {opts.context}")
    lines.append(
        f"  rule of thumb 2*N = {_n(2 * est.params_total)}: {_off(est.flops_per_token, 2 * est.params_total)}"
        + (" (N counts idle experts)" if c.is_moe else "")
    )
    if att > 0.1 * est.flops_per_token:
        lines.append(
            f"    - attention over {opts.context} tokens is {100 * att / est.flops_per_token:.0f}% of the "
            "FLOPs and is not in 2*N"
        )
    return lines


def _totals(opts: Options, est: Estimate) -> list[str]:
    lines = ["ACTIVATIONS / WORKSPACE"]
    t = min(opts.batch * opts.context, PREFILL_CHUNK)
    lines.append(
        f"  T = min(batch*context, {PREFILL_CHUNK}) = {t} tokens per prefill chunk; "
        f"T*(4*d + qkv widths + 3*MLP width)*{opts.act_bytes} bytes + batch*V*4 (fp32 logits) = "
        f"{_b(est.activation_bytes)}"
    )
    lines.append(
        f"TOTAL weights + KV + activations = {_b(est.weight_bytes)} + {_b(est.kv_bytes)} + "
        f"{_b(est.activation_bytes)} = {_b(est.total_bytes)}"
    )
    if est.gpu_bytes is not None:
        lines.append(
            f"FIT usable = GPU {_b(est.gpu_bytes)} - reserve (CUDA context, workspaces; "
            f"min(1 GiB, 10%)) = {_b(est.usable_bytes)}: {'fits' if est.fits else 'does not fit'}; "
            f"largest context at batch {opts.batch}: {est.max_context}; "
            f"largest batch at context {opts.context}: {est.max_batch}"
        )
    return lines
