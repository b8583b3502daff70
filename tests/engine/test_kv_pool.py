"""The CPU KV pool: sized to what the context (x batch) can use, and resident only where it is written.

The closed form is independent of the engine's code: the context from the GGUF's own metadata (gguf-py's
reader), the bytes per token from llmcli.estimate.kv_bytes_per_token (what `llm estimate` reports).
"""

from __future__ import annotations

import dataclasses
import math

import gguf
import pytest
import torch

from llmcli.engine.llm_engine import DEFAULT_CPU_KV_GIB, LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.estimate import kv_bytes_per_token

BLOCK = 16


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model, config = load_model(smollm2_gguf, "cpu", torch.float32)
    return model, config


def _pool_bytes(engine: LLMEngine) -> int:
    return sum(c.numel() * c.element_size() for c in engine.runner.caches)


def _context(path) -> int:
    r = gguf.GGUFReader(path)
    return int(r.get_field("llama.context_length").contents())


def test_default_pool_holds_one_context(smollm2, smollm2_gguf):
    model, config = smollm2
    ctx = _context(smollm2_gguf)
    assert ctx == 8192 and config.max_position_embeddings == ctx
    engine = LLMEngine(model, config)
    per_token = kv_bytes_per_token(config, 4)
    assert per_token == 30 * 2 * 3 * 64 * 4  # layers x (K, V) x kv heads x head_dim x fp32: 46,080 bytes
    blocks = math.ceil(ctx / BLOCK)
    assert len(engine.block_manager.blocks) == blocks == 512
    # blocks + the runner's one scratch block (padding writes) x block_size x bytes per token: 360 MiB + 1 block
    assert _pool_bytes(engine) == (blocks + 1) * BLOCK * per_token
    assert engine.context_len == ctx  # the pool does not shorten the model's context


def test_pool_grows_with_max_batch_up_to_the_cap_and_kv_cache_gib_overrides(smollm2):
    model, config = smollm2
    per_block = kv_bytes_per_token(config, 4) * BLOCK
    two = LLMEngine(model, config, max_batch=2)
    assert len(two.block_manager.blocks) == 2 * 512
    cap = int(DEFAULT_CPU_KV_GIB * 2**30 // per_block)  # 1,456 blocks: 4 contexts would be 1.4 GiB
    many = LLMEngine(model, config, max_batch=4)
    assert len(many.block_manager.blocks) == cap < 4 * 512
    explicit = LLMEngine(model, config, kv_cache_gib=0.75)
    assert len(explicit.block_manager.blocks) == int(0.75 * 2**30 // per_block)


def test_a_long_context_model_is_capped_by_the_cpu_budget(tiny_model):
    model, config = load_model(tiny_model("llama"), "cpu", torch.float32)
    long = dataclasses.replace(config, max_position_embeddings=10**9)
    engine = LLMEngine(model, long)
    per_block = kv_bytes_per_token(long, 4) * BLOCK
    assert len(engine.block_manager.blocks) == int(DEFAULT_CPU_KV_GIB * 2**30 // per_block)
    assert engine.context_len == engine.pool_tokens < 10**9


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_pool_is_resident_only_where_written(tiny_model):
    """A 1 GiB pool costs (almost) nothing until K/V are written, and generation still sees zeros elsewhere."""
    model, config = load_model(tiny_model("llama"), "cpu", torch.float32)
    before = _rss_bytes()
    engine = LLMEngine(model, config, kv_cache_gib=1.0)
    assert _pool_bytes(engine) > 2**30 - 2**20
    grown = _rss_bytes() - before
    assert grown < 64 * 2**20, f"building the pool made {grown / 2**20:.0f} MiB resident"
    assert all(int(c.count_nonzero()) == 0 for c in engine.runner.caches)  # untouched pages read as zeros
    small = LLMEngine(model, config, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert engine.generate([[1, 2, 3, 4]], params) == small.generate([[1, 2, 3, 4]], params)


def test_int8_pool_is_what_llm_estimate_says_and_holds_1_94x_the_bf16_tokens(smollm2):
    model, config = smollm2
    per_token = kv_bytes_per_token(config, "int8")  # `llm estimate --kv-dtype int8`'s "KV cache per token"
    assert per_token == 30 * 2 * 3 * (64 + 2)  # layers x (K, V) x kv heads x (int8 codes + one fp16 scale)
    gib = 0.05
    int8 = LLMEngine(model, config, kv_cache_gib=gib, kv_dtype="int8")
    caches = int8.runner.caches + int8.runner.scales
    assert sum(c.numel() * c.element_size() for c in caches) == (len(int8.block_manager.blocks) + 1) * BLOCK * per_token
    bf16 = LLMEngine(model, config, kv_cache_gib=gib, kv_dtype="bf16")
    assert int8.pool_tokens == int(gib * 2**30 // (BLOCK * per_token)) * BLOCK == 4512
    assert bf16.pool_tokens == 2320 and int8.pool_tokens / bf16.pool_tokens > 1.9
