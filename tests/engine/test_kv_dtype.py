"""--kv-dtype: int8/fp8 caches against the 16-bit cache on every dense family, the pool's bytes against
`llm estimate`'s formula, and MLA's refusal.

Tolerances (of the largest |logit| of the reference, tiny random models, 40-token prompt over 16-token blocks):
a bf16 cache is within 1%, int8 within 3% and fp8 (e4m3, 3 mantissa bits) within 15% of a float32 cache; int8
is measured 2-4x bf16's own error (gemma3, the worst, 1.9% vs 0.6%).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.errors import UserError
from llmcli.estimate import kv_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
DENSE += ["gpt2", "gpt_neox", "phi", "bloom", "mpt", "falcon"]
TOLERANCE = {"bf16": 0.01, "int8": 0.03, "fp8": 0.15}


def _logits(model, config, kv_dtype, prompts):
    """Logits of every position of prompts[0] (batch 1: the cache read as a slice), and of the last position of
    every prompt in one batched step (the block-gather path)."""
    engine = LLMEngine(model, config, block_size=16, num_blocks=32, kv_dtype=kv_dtype)
    seq = engine.add(prompts[0][:1])
    one = engine.extend(seq, prompts[0][1:])
    engine.release(seq)
    seqs = [engine.add(p) for p in prompts]
    batched = engine.forward_logits(seqs)
    for s in seqs:
        engine.release(s)
    return one, batched


@pytest.mark.parametrize("family", DENSE)
def test_quantized_cache_logits_close_to_float(tiny_model, family):
    model, config = load_model(tiny_model(family))
    prompts = [random_ids(40, 1), random_ids(29, 2)]
    ref_one, ref_batched = _logits(model, config, None, prompts)
    scale = ref_one.abs().max().item()
    for kv, tol in TOLERANCE.items():
        one, batched = _logits(model, config, kv, prompts)
        assert (one - ref_one).abs().max().item() < tol * scale, kv
        assert (batched - ref_batched).abs().max().item() < tol * scale, kv
        assert (one - ref_one).abs().max().item() > 0, kv  # the cache really is stored at lower precision


@pytest.mark.parametrize("kv", ["int8", "fp8", "bf16"])
def test_pool_bytes_equal_the_estimate(tiny_model, kv):
    model, config = load_model(tiny_model("llama"))
    budget = 1 / 1024  # GiB
    engine = LLMEngine(model, config, block_size=16, kv_cache_gib=budget, kv_dtype=kv)
    caches = engine.runner.caches + [s for s in engine.runner.scales if s is not None]
    allocated = sum(t.numel() * t.element_size() for t in caches)
    blocks = len(engine.block_manager.blocks)
    per_token = kv_bytes_per_token(config, kv)
    assert allocated == (blocks + 1) * 16 * per_token  # + the runner's scratch block
    assert blocks == int(budget * 2**30 // (16 * per_token))


def test_int8_pool_holds_nearly_twice_the_bf16_tokens(tiny_model):
    model, config = load_model(tiny_model("llama"))  # head_dim 16: 16 + 2 bytes of int8 vs 32 of bf16
    n = {kv: LLMEngine(model, config, kv_cache_gib=1 / 256, kv_dtype=kv).pool_tokens for kv in ("bf16", "int8")}
    assert n["int8"] / n["bf16"] == pytest.approx(32 / 18, rel=0.01)


def test_mla_refuses_a_quantized_cache(tiny_model):
    model, config = load_model(tiny_model("deepseek_v2"))
    with pytest.raises(UserError, match="not supported for MLA"):
        LLMEngine(model, config, num_blocks=8, kv_dtype="int8")


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_speculative_rollback_over_an_int8_cache(tiny_model, method):
    """Rejected drafts roll the int8 cache back (codes and scales): greedy output is plain int8 decoding's, and a
    draft with the target's own weights and cache format is accepted every time."""
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.speculative import SpeculativeDecoder

    model, config = load_model(tiny_model("llama"))
    target = LLMEngine(model, config, block_size=4, num_blocks=128, kv_dtype="int8")
    draft = LLMEngine(model, config, block_size=4, num_blocks=128, kv_dtype="int8") if method == "self" else None
    prompt = [5, 17, 42, 99, 7, 5, 17, 42, 99, 7, 5, 17, 3, 250, 12, 5, 17]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = target.generate([prompt], params)[0]
    dec = SpeculativeDecoder(target, draft, method="draft" if draft else "ngram", num_draft=5)
    assert dec.generate(prompt, params) == plain
    assert dec.stats.drafted > 0
    if method == "self":
        assert dec.stats.acceptance_rate == 1.0


def test_prefix_cache_reuses_int8_blocks_with_their_scales(tiny_model):
    model, config = load_model(tiny_model("llama"))
    prompt = random_ids(40, 3)
    fresh = LLMEngine(model, config, block_size=16, num_blocks=32, kv_dtype="int8")
    want = fresh.forward_window(prompt)
    cached = LLMEngine(model, config, block_size=16, num_blocks=32, kv_dtype="int8")
    first = cached.add(prompt[:33])
    cached.forward_logits([first])
    cached.release(first)  # its two full blocks stay cached
    seq = cached.add(prompt)
    assert seq.num_cached_prompt == 32
    got = cached.forward_logits([seq])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
