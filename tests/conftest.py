"""Shared fixtures: the real SmolLM2 GGUF and small random models built by transformers itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hub; the pull tests start their own local server and set HF_ENDPOINT.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Small but non-degenerate shapes: GQA, several layers, head_dim != hidden/heads where the family allows.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(
            TINY,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "mistral": ("MistralConfig", dict(TINY, sliding_window=16, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(TINY, use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(TINY, head_dim=32, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(TINY, head_dim=32)),
    "gemma2": (
        "Gemma2Config",
        dict(
            TINY,
            head_dim=32,
            sliding_window=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            TINY,
            num_hidden_layers=4,
            head_dim=32,
            sliding_window=16,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
        ),
    ),
    "phi3": ("Phi3Config", dict(TINY, pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=512)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=512,
        ),
    ),
    "phi": ("PhiConfig", dict(TINY, partial_rotary_factor=0.5, hidden_act="gelu_new")),
    # 6 heads: ALiBi slopes for a head count that is not a power of two
    "bloom": ("BloomConfig", dict(vocab_size=256, hidden_size=96, n_layer=3, n_head=6)),
    "mpt": (
        "MptConfig",
        dict(
            vocab_size=256,
            d_model=64,
            n_layers=3,
            n_heads=4,
            max_seq_len=512,
            attn_config={"alibi": True, "clip_qkv": 0.3},  # transformers ignores alibi_bias_max (always 8)
        ),
    ),
    # falcon's new decoder architecture (40b/180b) with a key/value head per query head: attention and MLP in
    # parallel, a LayerNorm each (falcon-7b's multi-query layout: tests/models/test_legacy_families.py)
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_kv_heads=4,
            new_decoder_architecture=True,
            max_position_embeddings=512,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(TINY, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            TINY,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(TINY, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            TINY,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            TINY,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_key_value_heads=4,
        ),
    ),
}


def build_tiny_model(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight transformers model of `family` (fp32 safetensors) into directory."""
    import torch
    import transformers

    cls_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb everything so every weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_byte_tokenizer(directory: Path, extra: list[str] = ()) -> None:
    """tokenizer.json for the tiny models: a byte-level BPE with no merges, exactly their 256 ids (plus `extra` added
    tokens, for tests of a tokenizer larger than the model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if extra:
        tok.add_tokens(list(extra))
    tok.save(str(Path(directory) / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **overrides) -> directory with config.json + model.safetensors (cached per session)."""
    cache: dict = {}

    def make(family: str, **overrides) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny_model(family, d, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP barrier stalls when other processes share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched by `make model`, which `make test` runs first)."""
    from llmcli.hub.default_model import default_model_path

    return default_model_path(fetch=True)


def random_ids(n: int, seed: int) -> list[int]:
    """n token ids of a seeded random prompt (ids 3..255: the tiny models' byte vocabulary, no specials)."""
    import torch

    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tiny_engine(loaded, block_size: int = 4, num_blocks: int = 512):
    """An LLMEngine over a loaded (model, config) with small blocks, so short prompts span several."""
    from llmcli.engine.llm_engine import LLMEngine

    model, config = loaded
    return LLMEngine(model, config, block_size=block_size, num_blocks=num_blocks)
