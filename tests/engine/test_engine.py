"""The paged KV cache, prefix caching, batching, rollback, multi-token forward and the sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_engine

from llmcli.engine.block_manager import BlockManager
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampler import sample
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: sliding window 16
def loaded(request, tiny_model):
    return load_model(tiny_model(request.param))


def _full_recompute(loaded, ids: list[int], n: int) -> list[int]:
    """Greedy decoding without any cache reuse: recompute the whole sequence for every token."""
    out = []
    for _ in range(n):
        eng = tiny_engine(loaded, block_size=1024, num_blocks=1)  # one contiguous block, fresh each time
        seq = eng.add(ids + out)
        out.append(int(eng.forward_logits([seq])[0].argmax()))
    return out


def test_paged_cache_matches_full_recompute(loaded):
    ids = random_ids(21, 0)
    paged = tiny_engine(loaded, block_size=4).generate([ids], GREEDY)[0]  # 60 tokens: 15 block boundaries
    assert paged == _full_recompute(loaded, ids, 40)
    assert paged == tiny_engine(loaded, block_size=128, num_blocks=4).generate([ids], GREEDY)[0]


def test_batch_matches_single(loaded):
    prompts = [random_ids(n, n) for n in (5, 23, 11, 34)]
    eng = tiny_engine(loaded)
    batched = eng.generate(prompts, GREEDY)
    alone = [tiny_engine(loaded).generate([p], GREEDY)[0] for p in prompts]
    assert batched == alone
    assert eng.block_manager.num_free == 512  # everything returned to the pool


def test_batched_step_logits(loaded):
    """One step over 3 sequences of different lengths gives each the logits it gets alone."""
    prompts = [random_ids(n, 10 + n) for n in (3, 17, 9)]
    eng = tiny_engine(loaded)
    seqs = [eng.add(p) for p in prompts]
    got = eng.forward_logits(seqs)
    for p, row in zip(prompts, got):
        solo = tiny_engine(loaded)
        assert torch.allclose(row, solo.forward_logits([solo.add(p)])[0], atol=1e-5)


def test_prefix_reuse(loaded):
    eng = tiny_engine(loaded)
    first = random_ids(30, 3)
    out1 = eng.generate([first], GREEDY)[0]
    # a follow-up turn: the previous prompt and reply, then more tokens
    follow = first + out1 + random_ids(7, 4)
    seq = eng.add(follow, GREEDY)
    # every full block of prompt + reply was cached except the one holding the never-computed last token
    computed_before = len(first) + len(out1) - 1
    assert seq.num_cached_prompt == computed_before // 4 * 4
    assert seq.num_computed == seq.num_cached_prompt
    stats_out = []
    while not seq.finished:
        stats_out.append(eng.step([seq])[0])
    eng.release(seq)
    assert stats_out == tiny_engine(loaded).generate([follow], GREEDY)[0]

    # stream() reports the reuse too
    events = list(eng.stream(follow, SamplingParams(temperature=0, max_tokens=3)))
    assert events[-1].stats.cached_prompt_tokens == (len(follow) - 1) // 4 * 4
    assert [e.token_id for e in events] == stats_out[:3]


def test_rollback_then_regenerate(loaded):
    eng = tiny_engine(loaded)
    ids = random_ids(13, 5)
    seq = eng.add(ids, GREEDY)
    for _ in range(20):
        eng.step([seq])
    original = seq.output_ids
    used = eng.block_manager.num_free
    eng.truncate(seq, len(ids) + 6)  # mid-block: the partial block loses its key
    assert eng.block_manager.num_free > used
    while seq.num_generated < 20:
        eng.step([seq])
    assert seq.output_ids == original


def test_rollback_into_shared_block_copies_it(loaded):
    eng = tiny_engine(loaded)
    ids = random_ids(26, 6)
    a = eng.add(ids, GREEDY)
    for _ in range(10):
        eng.step([a])
    b = eng.add(list(a.token_ids[:-1]) + [7, 8, 9], GREEDY)  # shares a's first blocks
    shared = b.block_table[: b.num_cached_prompt // 4]
    assert shared and shared == a.block_table[: len(shared)]
    eng.truncate(b, 10)  # inside a shared block: b must get its own copy
    assert b.block_table[-1] != a.block_table[2]
    b_out = [eng.step([b])[0] for _ in range(5)]
    for _ in range(5):
        eng.step([a])
    ref = tiny_engine(loaded)
    ra = ref.add(ids, GREEDY)
    for _ in range(15):
        ref.step([ra])
    assert a.output_ids == ra.output_ids  # a's cache untouched by b
    assert b_out == tiny_engine(loaded).generate([ids[:10]], SamplingParams(temperature=0, max_tokens=5))[0]


def test_k_token_forward_equals_single_steps(loaded):
    eng = tiny_engine(loaded)
    ids = random_ids(19, 7)
    extra = random_ids(6, 8)
    seq = eng.add(ids)
    eng.forward_logits([seq])
    k_logits = eng.extend(seq, extra)  # 6 tokens over an 19-token cache
    assert k_logits.shape == (6, loaded[1].vocab_size)

    one = tiny_engine(loaded)
    s1 = one.add(ids)
    one.forward_logits([s1])
    singles = []
    for t in extra:
        s1.token_ids.append(t)
        singles.append(one.forward_logits([s1])[0])
    assert torch.allclose(k_logits, torch.stack(singles), atol=1e-5)


def test_preemption_when_the_pool_is_small(loaded):
    prompts = [random_ids(n, 20 + n) for n in (9, 14, 6)]
    small = tiny_engine(loaded, block_size=4, num_blocks=24)  # 96 slots for 3 x ~50 tokens: must preempt
    assert small.generate(prompts, GREEDY) == tiny_engine(loaded).generate(prompts, GREEDY)


def test_scattered_blocks_match_full_recompute(loaded):
    """Batch-1 decode over non-consecutive blocks reads the cache through a gather, not a slice."""
    from collections import OrderedDict

    ids = random_ids(21, 3)
    eng = tiny_engine(loaded, block_size=4, num_blocks=64)
    bm = eng.block_manager
    bm.free = OrderedDict((i, None) for i in reversed(range(64)))  # every next block is already taken
    seq = eng.add(ids, GREEDY)
    out = [eng.step([seq])[0] for _ in range(40)]
    assert seq.block_table == sorted(seq.block_table, reverse=True)  # really scattered
    assert out == _full_recompute(loaded, ids, 40)


# ---- block manager ------------------------------------------------------------------------------


def test_block_manager_grows_a_sequence_into_the_next_block():
    """A sequence that grows, finishes and comes back longer (a chat turn) keeps one run of blocks."""
    bm = BlockManager(num_blocks=16, block_size=2)
    other = Sequence([50, 51, 52])  # something else holds the first blocks
    bm.match_prefix(other)
    bm.ensure_capacity(other, 3)
    turn = Sequence([1, 2, 3, 4, 5])
    bm.match_prefix(turn)
    turn.token_ids += [6, 7, 8, 9]  # generated
    bm.ensure_capacity(turn, 9)
    bm.commit(turn, 9)
    first = turn.block_table[0]
    assert turn.block_table == list(range(first, first + 5))
    bm.free_sequence(turn)  # released tail first: the free list now runs backwards over these blocks
    bm.free_sequence(other)
    nxt = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23])
    bm.match_prefix(nxt)
    assert nxt.num_cached_prompt == 8
    bm.ensure_capacity(nxt, 15)
    assert nxt.block_table == list(range(first, first + 8))


def test_block_manager_lru_eviction_and_refcounts():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence([1, 2, 3, 4, 5])
    bm.match_prefix(a)
    bm.ensure_capacity(a, 5)
    bm.commit(a, 5)  # blocks [1,2], [3,4] keyed
    bm.free_sequence(a)
    assert bm.num_free == 4
    b = Sequence([1, 2, 3, 4, 9])
    bm.match_prefix(b)
    assert b.num_cached_prompt == 4 and bm.num_free == 2
    c = Sequence([1, 2, 7])
    bm.match_prefix(c)
    assert c.num_cached_prompt == 2 and bm.blocks[c.block_table[0]].ref_count == 2
    bm.free_sequence(b)
    bm.free_sequence(c)
    # fill the pool with unrelated blocks: the cached prefix gets evicted
    d = Sequence(list(range(100, 108)))
    bm.match_prefix(d)
    bm.ensure_capacity(d, 8)
    bm.free_sequence(d)
    e = Sequence([1, 2, 3, 4, 9])
    bm.match_prefix(e)
    assert e.num_cached_prompt == 0


# ---- sampler ------------------------------------------------------------------------------------


def test_sampler_filters_match_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from llmcli.engine.sampler import apply_repetition_penalty, filter_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ones = torch.ones(3)
    for kw, warper in [
        (dict(top_k=torch.full((3,), 7)), TopKLogitsWarper(7)),
        (dict(top_p=torch.full((3,), 0.8)), TopPLogitsWarper(0.8)),
        (dict(min_p=torch.full((3,), 0.1)), MinPLogitsWarper(0.1)),
    ]:
        args = dict(top_k=torch.zeros(3, dtype=torch.long), top_p=ones, min_p=torch.zeros(3))
        args.update(kw)
        ours = filter_logits(
            logits.clone(), args["top_k"], args["top_p"], args["min_p"], "top_k" in kw, "top_p" in kw, "min_p" in kw
        )
        theirs = warper(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), kw

    hist = [[1, 2, 2, 5], [0], [7, 8]]
    ours = apply_repetition_penalty(logits.clone(), hist, [1.3, 1.3, 1.3])
    for row in range(3):
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([hist[row]]), logits[row : row + 1].clone())
        assert torch.allclose(ours[row], theirs[0])


def test_sampler_distribution_and_seeds():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits[:1000], [p] * 1000, [g] * 1000) for _ in range(4)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # temperature sharpens: T=0.5 squares the probabilities (renormalized)
    p2 = SamplingParams(temperature=0.5)
    draws = sample(logits, [p2] * 4000, [g] * 4000)
    expect = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, expect / expect.sum(), atol=0.03)
    # top-k 2 never draws the others; greedy rows take the argmax
    draws = sample(logits[:500], [SamplingParams(top_k=2)] * 500, [g] * 500)
    assert set(draws.tolist()) <= {0, 1}
    assert sample(logits[:2], [SamplingParams(temperature=0)] * 2, [None, None]).tolist() == [0, 0]
    # the same seed gives the same draws
    a = [sample(logits[:1], [p], [torch.Generator().manual_seed(s_)]).item() for s_ in range(30)]
    b = [sample(logits[:1], [p], [torch.Generator().manual_seed(s_)]).item() for s_ in range(30)]
    assert a == b and len(set(a)) > 1


def test_seeded_sampling_batch_equals_alone(loaded):
    prompts = [random_ids(n, 30 + n) for n in (4, 12)]
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.2, top_k=20, seed=12, max_tokens=12, ignore_eos=True),
    ]
    batched = tiny_engine(loaded).generate(prompts, params)
    alone = [tiny_engine(loaded).generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert batched == alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny_model):
    path = tiny_model("mistral")
    prompts = [random_ids(n, 40 + n) for n in (9, 30)]
    cpu = LLMEngine(*load_model(path), block_size=4, num_blocks=256).generate(prompts, GREEDY)
    model, config = load_model(path, "cuda", torch.float32)
    gpu = LLMEngine(model, config, block_size=4, num_blocks=256).generate(prompts, GREEDY)
    assert gpu == cpu
    bf16 = LLMEngine(*load_model(path, "cuda", torch.bfloat16), block_size=16, num_blocks=64)
    assert all(len(o) == 40 for o in bf16.generate(prompts, GREEDY))


# ---- text -----------------------------------------------------------------------------------------------------


def test_text_stream_drops_end_of_sequence_unless_kept():
    from llmcli.engine.llm_engine import GenerationStats, StreamEvent
    from llmcli.engine.text import TextStream

    class Letters:  # token i is the letter chr(97 + i)
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i) for i in ids)

    stats = GenerationStats()
    events = [StreamEvent(t, stats) for t in (0, 1, 9, 2)]
    text = TextStream(Letters(), {9})
    assert "".join(text.pieces(events)) == "abc" and text.token_ids == [0, 1, 2] and text.stats is stats
    kept = TextStream(Letters(), {9}, keep_eos=True)  # --ignore-eos: the marker is part of the reply
    assert "".join(kept.pieces(events)) == "abjc" and kept.token_ids == [0, 1, 9, 2]
