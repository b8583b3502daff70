"""The context is enforced in the engine: a prompt that leaves no room is refused with the numbers, and generation
(plain, batched, speculative) stops at the context with finish_reason "length"."""

from __future__ import annotations

import pytest
import torch

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.speculative import SpeculativeDecoder
from llmcli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 96  # the tiny model's max_position_embeddings here


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model("llama", max_position_embeddings=CTX))


def _engine(loaded, num_blocks=512, block_size=4) -> LLMEngine:
    model, config = loaded
    return LLMEngine(model, config, block_size=block_size, num_blocks=num_blocks)


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_context_is_the_smaller_of_model_and_pool(loaded):
    assert _engine(loaded).context_len == CTX
    assert _engine(loaded, num_blocks=5).context_len == 20  # 5 blocks of 4 tokens


@pytest.mark.parametrize("n", [CTX, CTX + 1, 20_000])
def test_prompt_without_room_is_refused_with_the_numbers(loaded, n):
    eng = _engine(loaded)
    with pytest.raises(UserError) as e:
        eng.add(_ids(n), _greedy(5))
    msg = str(e.value)
    assert f"{n:,} tokens" in msg and f"{CTX} tokens" in msg and f"at most {CTX - 1}" in msg
    assert eng.block_manager.num_free == 512  # refused before any work
    with pytest.raises(UserError):
        list(eng.stream(_ids(n), _greedy(5)))
    with pytest.raises(UserError):
        eng.generate([_ids(3), _ids(n)], _greedy(5))  # refused before the short prompt runs either
    assert eng.block_manager.num_free == 512


def test_pool_smaller_than_the_model_says_so(loaded):
    eng = _engine(loaded, num_blocks=5)
    with pytest.raises(UserError, match=r"the prompt is 30 tokens but the context holds 20 tokens \(the KV cache"):
        eng.add(_ids(30), _greedy(1))


@pytest.mark.parametrize(("prompt", "max_tokens"), [(CTX - 1, 10), (CTX - 10, 10), (CTX - 10, 1000), (5, 10_000)])
def test_stream_stops_at_the_context(loaded, prompt, max_tokens):
    eng = _engine(loaded)
    events = list(eng.stream(_ids(prompt), _greedy(max_tokens)))
    assert len(events) == min(max_tokens, CTX - prompt)  # prompt + reply never exceed the context
    assert events[-1].stats.finish_reason == "length"
    assert eng.block_manager.num_free == 512


def test_stopping_at_the_context_changes_no_token(loaded):
    """The reply cut by the context is the prefix of the one a larger context gives (same weights)."""
    ids = _ids(CTX - 20, 3)
    small = [ev.token_id for ev in _engine(loaded).stream(ids, _greedy(50))]
    model, config = loaded
    from dataclasses import replace

    big = LLMEngine(model, replace(config, max_position_embeddings=CTX * 2), block_size=4, num_blocks=512)
    assert len(small) == 20
    assert small == [ev.token_id for ev in big.stream(ids, _greedy(50))][:20]


def test_generate_batched_stops_each_at_the_context(loaded):
    eng = _engine(loaded)
    outs = eng.generate([_ids(CTX - 3, 1), _ids(10, 2), _ids(CTX - 1, 4)], _greedy(40))
    assert [len(o) for o in outs] == [3, 40, 1]


def test_a_window_may_fill_the_context_but_not_more(loaded):
    eng = _engine(loaded)
    assert eng.forward_window(_ids(CTX), all_positions=True).shape[0] == CTX
    with pytest.raises(UserError, match=f"{CTX + 1} tokens"):
        eng.forward_window(_ids(CTX + 1), all_positions=True)


def test_extend_past_the_context_is_refused(loaded):
    eng = _engine(loaded)
    seq = eng.add(_ids(CTX - 2), _greedy(10))
    eng.step([seq])
    with pytest.raises(UserError, match="past the context"):
        eng.extend(seq, _ids(5))


def _prompts_near_a_loop(loaded) -> list[list[int]]:
    """Prompts that end at different points of the loops a tiny greedy model falls into, so n-gram drafts are long
    right where the context ends."""
    base = (_ids(8, 5) * 6)[: CTX // 2]
    out = [ev.token_id for ev in _engine(loaded).stream(base, _greedy(500))]
    return [(base + out)[:n] for n in range(CTX // 2 + 4, CTX - 6, 3)]


def test_ngram_speculation_stops_at_the_context_with_the_plain_tokens(loaded):
    drafted = 0
    for ids in _prompts_near_a_loop(loaded):
        plain = [ev.token_id for ev in _engine(loaded).stream(ids, _greedy(500))]
        spec = SpeculativeDecoder(_engine(loaded), None, method="ngram", num_draft=8)
        events = list(spec.stream(ids, _greedy(500)))
        assert len(plain) == CTX - len(ids)
        assert [ev.token_id for ev in events] == plain, len(ids)
        assert events[-1].stats.finish_reason == "length"
        drafted += spec.stats.drafted
    assert drafted > 0


def test_draft_with_a_smaller_context_stops_drafting(loaded):
    """A draft model whose own context ends before the target's: drafting stops there, the target goes on to its
    own context, and greedy output equals plain decoding."""
    ids = _ids(CTX // 2, 6)
    plain = [ev.token_id for ev in _engine(loaded).stream(ids, _greedy(500))]
    draft = _engine(loaded, num_blocks=(CTX // 2 + 20) // 4)
    spec = SpeculativeDecoder(_engine(loaded), draft, method="draft", num_draft=6)
    events = list(spec.stream(ids, _greedy(500)))
    assert len(plain) == CTX - len(ids)
    assert [ev.token_id for ev in events] == plain
    assert events[-1].stats.finish_reason == "length"
