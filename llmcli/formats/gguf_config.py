"""GGUF metadata -> a transformers-style config dict, and from it the ModelConfig.

gguf_to_hf_config fills the keys a config.json would have from llama.cpp's <arch>.* metadata (plus the
tensor table, for shapes and flags), so llmcli.config.from_hf_dict is the one normalisation path for every
format. What GGUF does not store directly is recovered here: llama3 rope scaling from the stored
per-frequency factors, phi3 longrope from its factor tensors, the gemma query scale llama.cpp hard-codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.config import ModelConfig, check_sizes, from_hf_dict
from llmcli.errors import UserError
from llmcli.formats.gguf_reader import open_gguf_model, read_f32

# GGUF general.architecture -> transformers model_type.
ARCH_TO_FAMILY = {
    "llama": "llama",  # also Mistral/Mixtral GGUFs, which llama.cpp writes as llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gptneox": "gpt_neox",
    "phi2": "phi",
    "bloom": "bloom",
    "mpt": "mpt",
    "falcon": "falcon",
}
# LayerNorm families: partial rotary (rope.dimension_count is the rotary width, not the head) or no rope at all.
LAYER_NORM_FAMILIES = ("gpt2", "gpt_neox", "phi", "bloom", "mpt", "falcon")


def load_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF model; UserError naming the file for metadata that is missing or malformed."""
    meta, infos = open_gguf_model(path)
    tensors = {t.name: t for t in infos}
    try:
        return check_sizes(from_hf_dict(gguf_to_hf_config(meta, tensors)), path)
    except KeyError as e:
        raise UserError(f"{path} lacks the GGUF metadata key {e.args[0]!r}") from None
    except (TypeError, ValueError, IndexError) as e:  # e.g. a count stored as a string, an empty array
        raise UserError(f"{path} has GGUF metadata that cannot be read as a model config ({e})") from None
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}", e.exit_code) from None


def gguf_to_hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A transformers-style config.json dict from GGUF metadata (+ the tensor table, for shapes and flags)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise UserError("GGUF file has no general.architecture")
    family = ARCH_TO_FAMILY.get(arch)
    if family is None:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCH_TO_FAMILY)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hf = _common_keys(meta, arch, family, tensors, get)
    if family in LAYER_NORM_FAMILIES:
        _add_layer_norm_keys(hf, family, tensors, get)
    _add_attention_keys(hf, family, tensors, get)
    _add_moe_keys(hf, family, tensors, get)
    return hf


_Get = Callable[..., Any]  # get(key, default=None): the metadata value <arch>.<key>


def _common_keys(meta: dict[str, Any], arch: str, family: str, tensors: dict[str, Any], get: _Get) -> dict[str, Any]:
    """The keys every family has: sizes, norms, rope (with its scaling), embeddings and special ids."""
    hidden = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = get("attention.head_count_kv", heads)
    n_layers = int(meta[f"{arch}.block_count"])
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    if family in ("phi3", *LAYER_NORM_FAMILIES):  # rope.dimension_count is the rotary dim; the head is hidden/heads
        head_dim = get("attention.key_length") or hidden // heads

    embd = tensors.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    # The embedding's row count is what the weights really have; the token list is a fallback.
    vocab = int(embd.shape[-1]) if embd is not None else (get("vocab_size") or len(tokens or ()))

    hf: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads)),
        "head_dim": int(head_dim),
        "intermediate_size": _ffn_length(get("feed_forward_length"), tensors),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
    }
    rotary = get("rope.dimension_count")
    if rotary and rotary != hf["head_dim"]:
        hf["partial_rotary_factor"] = rotary / hf["head_dim"]
    scaling = _rope_scaling(meta, arch, tensors, hf)
    if scaling:
        hf["rope_scaling"] = scaling
        if scaling.get("original_max_position_embeddings"):
            hf["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return hf


def _add_layer_norm_keys(hf: dict[str, Any], family: str, tensors: dict[str, Any], get: _Get) -> None:
    """gpt2/gpt_neox/phi/bloom/mpt: LayerNorm epsilon, biases from the tensor table, and the keys in the spelling
    each family's config.json uses (gpt2's n_embd, bloom's n_layer, mpt's d_model and attn_config)."""
    hf.pop("rms_norm_eps")
    eps = float(get("attention.layer_norm_epsilon", 1e-5))
    hidden, layers, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    if family == "gpt_neox":
        hf.update(layer_norm_eps=eps, hidden_act="gelu", attention_bias="blk.0.attn_qkv.bias" in tensors)
        hf["use_parallel_residual"] = bool(get("use_parallel_residual", True))
    elif family == "phi":
        hf.update(layer_norm_eps=eps, hidden_act="gelu_new")
    elif family == "falcon":  # llama.cpp's falcon: parallel attention, q/k/v grouped by key/value head
        hf.update(layer_norm_epsilon=eps, new_decoder_architecture=True, num_kv_heads=hf["num_key_value_heads"])
        hf.update(ffn_hidden_size=hf["intermediate_size"], bias="blk.0.attn_qkv.bias" in tensors)
        hf["num_ln_in_parallel_attn"] = 2 if "blk.0.attn_norm_2.weight" in tensors else 1
    elif family == "gpt2":
        hf.update(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=hf["intermediate_size"])
        hf.update(n_positions=hf["max_position_embeddings"], layer_norm_epsilon=eps)
    elif family == "bloom":
        hf.update(n_layer=layers, n_head=heads, seq_length=hf["max_position_embeddings"], layer_norm_epsilon=eps)
    else:  # mpt
        alibi = float(get("attention.max_alibi_bias", 0.0))
        hf.update(d_model=hidden, n_layers=layers, n_heads=heads, max_seq_len=hf["max_position_embeddings"])
        hf.update(expansion_ratio=hf["intermediate_size"] // hidden, layer_norm_epsilon=eps)
        hf["no_bias"] = "blk.0.attn_qkv.bias" not in tensors
        hf["attn_config"] = {"alibi": alibi > 0, "alibi_bias_max": alibi, "clip_qkv": get("attention.clamp_kqv")}


def _add_attention_keys(hf: dict[str, Any], family: str, tensors: dict[str, Any], get: _Get) -> None:
    """Per-family attention keys: biases, gemma's softcaps, query scale and local layers, sliding windows."""
    hidden, heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    window = get("attention.sliding_window")
    if family == "qwen2":
        hf["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if family == "llama" and "blk.0.attn_q.bias" in tensors:
        hf["attention_bias"] = True
    if family in ("gemma2", "gemma3_text"):
        hf["sliding_window"] = int(window or 4096)
        hf["attn_logit_softcapping"] = get("attn_logit_softcapping")
        hf["final_logit_softcapping"] = get("final_logit_softcapping")
        # llama.cpp hard-codes the query scale: hidden/heads for the 27B models, head_dim otherwise.
        is_27b = (family == "gemma2" and n_layers == 46) or (family == "gemma3_text" and n_layers == 62)
        hf["query_pre_attn_scalar"] = hidden // heads if is_27b else hf["head_dim"]
        if get("attention.scale"):  # newer converters may write the scale explicitly
            hf["query_pre_attn_scalar"] = float(get("attention.scale")) ** -2
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if family == "gemma":
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if family == "gemma3_text":
        # Older converters wrote neither key: llama.cpp then assumes every 6th layer global, local base 1e4.
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one bool per layer, True = sliding
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            hf["sliding_window_pattern"] = int(pattern)
        hf["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    if family == "phi3" and window:
        hf["sliding_window"] = int(window)


def _add_moe_keys(hf: dict[str, Any], family: str, tensors: dict[str, Any], get: _Get) -> None:
    """Expert counts and sizes: llama with experts is Mixtral; qwen2/3-moe (with qwen2-moe's shared expert)."""
    if family == "llama" and get("expert_count"):
        hf["model_type"] = "mixtral"
        hf["num_local_experts"] = int(get("expert_count"))
        hf["num_experts_per_tok"] = int(get("expert_used_count", 2))
    if family in ("qwen2_moe", "qwen3_moe"):
        hf["num_experts"] = int(get("expert_count", 0))
        hf["num_experts_per_tok"] = int(get("expert_used_count", 1))
        hf["moe_intermediate_size"] = int(get("expert_feed_forward_length") or _expert_ffn(tensors))
        hf["norm_topk_prob"] = family == "qwen3_moe"
        if family == "qwen2_moe":
            shared = get("expert_shared_feed_forward_length")
            if shared is None and "blk.0.ffn_up_shexp.weight" in tensors:
                shared = tensors["blk.0.ffn_up_shexp.weight"].shape[-1]
            hf["shared_expert_intermediate_size"] = int(shared or 0)


def _ffn_length(value: Any, tensors: dict[str, Any]) -> int:
    if isinstance(value, list):  # some converters write one value per layer
        value = max(value)
    if value:
        return int(value)
    t = tensors.get("blk.0.ffn_up.weight")
    return int(t.shape[-1]) if t is not None else 0


def _expert_ffn(tensors: dict[str, Any]) -> int:
    t = tensors.get("blk.0.ffn_up_exps.weight")
    return int(t.shape[1]) if t is not None else 0  # GGUF shapes are [in, out, experts]


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """Every end-of-generation id the file names: eos, and llama3-style eot/eom."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any], hf: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in tensors:  # phi3 longrope: the per-frequency factors are tensors
        return {
            "rope_type": "longrope",
            "long_factor": read_f32(tensors["rope_factors_long.weight"]).tolist(),
            "short_factor": read_f32(tensors["rope_factors_short.weight"]).tolist(),
            "original_max_position_embeddings": int(orig or hf["max_position_embeddings"]),
        }
    if "rope_freqs.weight" in tensors and arch == "llama":  # llama3: only the resulting factors are stored
        return llama3_scaling_from_factors(read_f32(tensors["rope_freqs.weight"]), hf["rope_theta"], hf["head_dim"])
    if kind in (None, "none") or factor in (None, 0, 1.0):
        return None
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(orig or hf["max_position_embeddings"])
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{gguf_key}") is not None:
                out[hf_key] = float(meta[f"{arch}.rope.scaling.{gguf_key}"])
    return out


LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors of llama3 rope scaling (the closed form HF and llama.cpp share)."""
    inv_freq = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    f = 1.0 / ((1 - smooth) / factor + smooth)
    f = np.where(wavelen < orig / high, 1.0, f)
    return np.where(wavelen > orig / low, factor, f)


def llama3_scaling_from_factors(f: np.ndarray, theta: float, dim: int) -> dict | None:
    """Recover llama3 rope_scaling parameters from llama.cpp's stored rope_freqs tensor.

    In the smooth band 1/f = (1-s)/factor + s with s linear in 1/wavelen; a line fit gives the slope and
    intercept, i.e. orig/(high-low) and -low/(high-low). Only the ratios orig/low and orig/high matter, so
    we fix orig at Llama 3's 8192 and solve for low/high (Llama 3.x comes out as exactly 1 and 4).
    """
    f = np.asarray(f, dtype=np.float64)
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return None
    orig = LLAMA3_ORIGINAL_CONTEXT
    inv_freq = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    x = inv_freq / (2 * math.pi)  # 1 / wavelen
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))  # float32 noise must not count as the smooth band
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(x[mid], s, 1)
        low, high = -b * orig / a, (1 - b) * orig / a
    else:  # no smooth band to fit: place the band edges between the unscaled and the fully scaled ones
        lo_edge = x[f >= factor * (1 - 1e-4)].max()  # highest 1/wavelen fully scaled
        hi_edge = x[f <= 1 + 1e-4].min()
        low, high = lo_edge * orig * 1.0001, hi_edge * orig * 0.9999
    # Prefer Llama 3.x's own (1, 4), then round numbers, when they reproduce the stored (float32) factors.
    candidates = [(round(factor, 3), 1.0, 4.0)] + [(round(factor, d), round(low, d), round(high, d)) for d in (3, 6)]
    for fa, lo, hi in candidates:
        if hi > lo > 0 and np.allclose(llama3_factors(theta, dim, fa, lo, hi, orig), f, rtol=1e-5, atol=1e-6):
            factor, low, high = fa, lo, hi
            break
    return {
        "rope_type": "llama3",
        "factor": float(factor),
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": orig,
    }
