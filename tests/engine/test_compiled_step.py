"""The compiled batch-1 decode step (llmcli.engine.compiled_step) against eager decoding and transformers.

Tiny random llama models keep the compile to seconds; the real SmolLM2 (kept Q4_1) case compiles for about a minute
on CPU, so it is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from llmcli.engine.compiled_step import MIN_BUCKET, CompiledDecodeStep, artifacts_path, cache_key
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path))
    return tmp_path


def _greedy(engine: LLMEngine, ids: list[int], n: int) -> list[int]:
    return engine.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])  # rope, q/k norms + tied head, gemma's norms
def test_compiled_greedy_matches_transformers(tiny_model, home, family):
    """fp32 tiny models: compiled greedy tokens equal transformers' over a context crossing the first bucket (256)."""
    import transformers

    path = tiny_model(family, max_position_embeddings=1024)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, config = load_model(path)
    engine = LLMEngine(model, config, block_size=16, num_blocks=80)
    assert engine.set_compile("on")
    ids = _prompt(MIN_BUCKET - 16)
    out = _greedy(engine, ids, 32)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    assert out == want[0, len(ids) :].tolist()


def test_compiled_equals_eager_across_buckets_with_bounded_compiles(tiny_model, home):
    """Positions 200 .. 551 run through buckets of 256, 512 and 1024 keys: the same greedy tokens as eager decoding
    (this random model meets a near-tie against transformers' fp32 order after ~50 tokens, eager and compiled alike,
    so the long run is checked against eager), and one graph serves every bucket (the key dimension is dynamic)."""
    path = tiny_model("llama", max_position_embeddings=1024)
    model, config = load_model(path)
    engine = LLMEngine(model, config, block_size=16, num_blocks=80)
    ids = _prompt(200)
    n = 2 * MIN_BUCKET + 40 - len(ids)
    eager = _greedy(engine, ids, n)
    assert engine.set_compile("on")
    torch._dynamo.reset()
    counters.clear()
    assert _greedy(engine, ids, n) == eager
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_equals_eager_and_persists(tiny_model, home):
    """Greedy output compiled == eager; the first compile writes its artifacts under the llmcli home, and the next
    engine of the same model loads them (its start event says cached). auto and off stay eager."""
    path = tiny_model("llama")
    model, config = load_model(path)
    engine = LLMEngine(model, config, block_size=16, num_blocks=32)
    ids = _prompt(40)
    eager = _greedy(engine, ids, 32)
    assert not engine.set_compile("auto")
    assert engine.runner.compiled_step is None
    events = []
    assert engine.set_compile("on", on_event=events.append)
    assert _greedy(engine, ids, 32) == eager
    assert [(e.kind, e.cached) for e in events] == [("start", False), ("done", False)]
    saved = artifacts_path(cache_key(None, model, 16, torch.float32))
    assert saved.is_file() and saved.is_relative_to(home)
    again = LLMEngine(model, config, block_size=16, num_blocks=32)
    assert again.set_compile("on", on_event=events.append)
    assert _greedy(again, ids, 32) == eager
    assert [(e.kind, e.cached) for e in events[2:]] == [("start", True), ("done", True)]
    assert not engine.set_compile("off")
    assert engine.runner.compiled_step is None


def test_compile_on_refused_where_unsupported(tiny_model, home):
    model, config = load_model(tiny_model("mistral", head_dim=16))  # sliding window: eager only
    engine = LLMEngine(model, config, block_size=16, num_blocks=32)
    with pytest.raises(UserError, match="--compile on is not supported"):
        engine.set_compile("on")
    with pytest.raises(UserError, match="unknown --compile"):
        engine.set_compile("maybe")


def test_bucket_blocks_are_powers_of_two():
    step = CompiledDecodeStep.__new__(CompiledDecodeStep)
    step.block_size, step.max_blocks = 16, 40
    assert [step.bucket_blocks(n) for n in (1, 256, 257, 512, 513, 5000)] == [16, 16, 32, 32, 40, 40]


@pytest.mark.slow
def test_smollm2_kept_compiled_equals_eager(smollm2_gguf, home):
    """The real model kept Q4_1: 48 greedy tokens compiled == eager (same kernels, one graph)."""
    engine = LLMEngine.load(smollm2_gguf, device="cpu", tokenizer=False, kv_cache_gib=0.05)
    ids = list(range(100, 164))
    eager = _greedy(engine, ids, 48)
    assert engine.set_compile("on")
    assert _greedy(engine, ids, 48) == eager
