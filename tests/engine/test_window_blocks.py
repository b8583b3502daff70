"""Sliding-window layer groups return the blocks that left their window to the pool.

References: transformers' own greedy output (fp32), closed-form block counts, and llmcli.estimate's KV bytes (what
`llm estimate` reports). Models: mistral (every layer slides), gemma2 (alternating sliding and full layers) and
qwen2 with use_sliding_window (full layers below max_window_layers), each built with a window of 16 and of 20 (not a
multiple of the block size).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.speculative import SpeculativeDecoder
from llmcli.estimate import kv_bytes, kv_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 16
KV_GIB = 0.002  # 2 MiB: the tiny models' caches need far less


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module", params=[("mistral", 16), ("gemma2", 16), ("qwen2", 20), ("mistral", 20)])
def windowed(request, tiny_model):
    family, window = request.param
    path = tiny_model(family, sliding_window=window)
    model, config = load_model(path)
    return path, model, config, window


def engine(windowed, **kw) -> LLMEngine:
    _, model, config, _ = windowed
    return LLMEngine(model, config, block_size=BS, kv_cache_gib=KV_GIB, **kw)


def held_blocks(n: int, window: int | None) -> int:
    """Blocks a layer needs once K/V of tokens [0, n) are cached: every one without a window; with one, those from
    the block of position n - window + 1 (the oldest key the next query sees) on."""
    total = (n + BS - 1) // BS
    return total if window is None else total - max(0, n - window + 1) // BS


def _reference(path, ids: list[int], n: int) -> list[int]:
    import transformers  # noqa: PLC0415 (the independent reference, only in tests)

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_layer_groups_have_their_own_pools(windowed):
    eng = engine(windowed)
    config, w = windowed[2], windowed[3]
    assert eng.runner.split and eng.runner.windows[-1] == w
    assert {config.layer_window(i) for i in range(config.num_layers)} == set(eng.runner.windows)


def test_greedy_matches_transformers_over_several_windows(windowed):
    """A 300-token prompt (computed in chunks, 18 windows long) then 40 tokens, by the streaming path and the
    scheduler's: both equal transformers' greedy output."""
    path = windowed[0]
    ids = random_ids(300, 3)
    want = _reference(path, ids, 40)
    eng = engine(windowed)
    assert [ev.token_id for ev in eng.stream(ids, greedy(40))] == want
    assert eng.generate([ids, ids[:90]], greedy(40))[0] == want
    assert eng.block_manager.num_used == [0] * len(eng.runner.windows)


@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_blocks_bounded_and_bytes_equal_estimate(windowed, kv):
    """During a 400-token generation each group holds exactly its closed-form block count, a windowed one never
    more than ceil((w + bs - 2) / bs), and the cache bytes in use equal `llm estimate`'s KV at that context."""
    _, _, config, w = windowed
    eng = engine(windowed, kv_dtype=None if kv == "fp32" else kv)
    seq = eng.add(random_ids(20, 4), greedy(400))
    for _ in range(400):
        eng.step([seq])
        n = seq.num_computed
        want = [held_blocks(n, g) for g in eng.runner.windows]
        assert eng.block_manager.num_used == want
        assert eng.runner.kv_bytes_in_use(want) == kv_bytes(config, n, 1, kv)
    assert eng.block_manager.num_used[-1] <= -(-(w + BS - 2) // BS)
    eng.release(seq)


def test_prefix_cache_reuse_equals_uncached(windowed):
    path = windowed[0]
    first, follow = random_ids(120, 5), random_ids(30, 6)
    eng = engine(windowed)
    out = eng.generate([first], greedy(20))[0]
    second = first + out + follow
    seq = eng.add(second, greedy(20))
    assert seq.num_cached_prompt >= 128  # the prompt's blocks, the windowed groups' last ones still cached
    eng.release(seq)
    assert [ev.token_id for ev in eng.stream(second, greedy(20))] == _reference(path, second, 20)


def test_ngram_rollback_equals_plain_greedy(windowed):
    """Speculation drafts from a repetitive prompt, and rejected drafts roll back over released blocks' edges."""
    ids = random_ids(24, 7) * 6
    plain = engine(windowed).generate([ids], greedy(80))[0]
    dec = SpeculativeDecoder(engine(windowed), method="ngram", num_draft=6)
    assert dec.generate(ids, greedy(80)) == plain
    assert dec.stats.drafted > dec.stats.accepted  # some drafts were rejected: rollbacks happened


def test_truncate_past_the_window_recomputes(windowed):
    """A rollback further than the window kept starts over from the prefix cache, and continues exactly."""
    ids = random_ids(40, 8)
    eng = engine(windowed)
    seq = eng.add(ids, greedy(100))
    for _ in range(100):
        eng.step([seq])
    cut = len(ids) + 30
    pool, table = eng.block_manager.pools[-1], seq.block_tables[-1]
    assert table[(cut - windowed[3]) // BS] == pool.scratch  # the block the window needs there is gone
    eng.truncate(seq, cut)
    assert table is not seq.block_tables[-1] and seq.num_computed == cut  # started over, recomputed to the cut
    tokens = list(seq.token_ids)
    seq.params = greedy(30)
    for _ in range(30):
        eng.step([seq])
    eng.release(seq)
    assert seq.token_ids[cut:] == engine(windowed).generate([tokens], greedy(30))[0]


def test_fixed_budget_holds_a_longer_context(windowed):
    """Under one --kv-cache-gib the windowed groups take only their bounded need, so the context is longer than
    with one pool in which every layer keeps every block: a budget of 3/4 of the model's whole context."""
    _, model, config, _ = windowed
    per_block = kv_bytes_per_token(config, 4) * BS  # fp32, every layer
    budget = 0.75 * per_block * (config.max_position_embeddings // BS)
    one_pool = LLMEngine(model, config, block_size=BS, num_blocks=int(budget // per_block))
    split = LLMEngine(model, config, block_size=BS, kv_cache_gib=budget / 2**30)
    assert one_pool.context_len == 0.75 * config.max_position_embeddings
    assert split.context_len == config.max_position_embeddings
    used = split.runner.kv_bytes_in_use([len(p.blocks) for p in split.block_manager.pools])
    assert used <= budget


def test_scored_window_logits_match_transformers(windowed):
    """forward_window (perplexity's path) over 300 tokens, computed in chunks that release blocks as they go, and
    again with the prefix cached: every position's logits equal transformers' forward."""
    import transformers  # noqa: PLC0415

    path = windowed[0]
    ids = random_ids(300, 9)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    eng = engine(windowed)
    for _ in range(2):
        got = eng.forward_window(ids, all_positions=True)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
