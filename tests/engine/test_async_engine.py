"""AsyncEngine: concurrent asyncio requests over the engine thread give each request's alone output; abort,
refusals (context, QueueFull), stats and shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from llmcli.engine.async_engine import AsyncEngine, QueueFull
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model("llama"))


def _engine(loaded, num_blocks=512, block_size=4) -> LLMEngine:
    model, config = loaded
    return LLMEngine(model, config, block_size=block_size, num_blocks=num_blocks)


def _alone(loaded, prompt) -> list[int]:
    """The reference: the request by itself through LLMEngine.stream (batch-1 steps, no scheduler)."""
    return [ev.token_id for ev in _engine(loaded).stream(prompt, GREEDY)]


async def _collect(handle) -> tuple[list[int], list[str | None]]:
    toks, reasons = [], []
    async for ev in handle:
        if ev.token_id >= 0:
            toks.append(ev.token_id)
        reasons.append(ev.finish_reason)
    return toks, reasons


def test_sixteen_concurrent_requests(loaded):
    prompts = [_prompt(3 + 5 * i, i) for i in range(16)]
    alone = [_alone(loaded, p) for p in prompts]
    llm = _engine(loaded)

    async def main():
        eng = AsyncEngine(llm, max_num_seqs=8, max_num_batched_tokens=32, max_queue=16)
        eng.start()
        handles = [eng.submit(p, GREEDY) for p in prompts]
        results = await asyncio.gather(*(_collect(h) for h in handles))
        stats = eng.stats()
        await eng.shutdown(grace_s=1)
        return results, stats, eng

    results, stats, eng = asyncio.run(main())
    assert [toks for toks, _ in results] == alone
    assert all(reasons[-1] == "length" and reasons.count("length") == 1 for _, reasons in results)
    assert stats.generation_tokens == 160 and stats.prompt_tokens == sum(map(len, prompts))
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_total == 512 and stats.running == 0
    assert not any(t.name == "llm-engine" for t in threading.enumerate())


def test_abort_refusals_and_shutdown(loaded):
    llm = _engine(loaded, num_blocks=32, block_size=16)  # the model's context: 512 tokens

    async def main():
        eng = AsyncEngine(llm, max_num_seqs=1, max_num_batched_tokens=64, max_queue=1)
        with pytest.raises(QueueFull):  # not started
            eng.submit(_prompt(4, 0), GREEDY)
        eng.start()
        with pytest.raises(UserError, match="600 tokens"):
            eng.submit(_prompt(600, 0), GREEDY)
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        a = eng.submit(_prompt(6, 1), long, n=2)
        first = await anext(a)
        assert first.finish_reason is None and a.num_cached_tokens == 0 and a.num_prompt_tokens == 6
        b = eng.submit(_prompt(6, 2), long)  # waits: one running slot
        with pytest.raises(QueueFull):
            eng.submit(_prompt(6, 3), long)
        a.abort(1)
        a.abort()
        toks, reasons = await _collect(a)
        assert reasons.count("abort") == 2
        await eng.shutdown(grace_s=0.01)  # b cannot finish 500 tokens in time (~1 ms each): aborted
        toks_b, reasons_b = await _collect(b)
        with pytest.raises(QueueFull):
            eng.submit(_prompt(4, 0), GREEDY)
        return reasons_b, eng.stats()

    reasons_b, stats = asyncio.run(main())
    assert reasons_b[-1] == "abort"
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


def test_error_in_a_step_reaches_the_reader(loaded):
    llm = _engine(loaded)

    class Broken:
        def fill_mask(self, logits):
            raise ValueError("grammar exploded")

        def accept(self, token_id):
            pass

        def is_finished(self):
            return False

    async def main():
        eng = AsyncEngine(llm)
        eng.start()
        h = eng.submit(_prompt(5, 0), GREEDY, constraint_factory=Broken)
        with pytest.raises(ValueError, match="grammar exploded"):
            await _collect(h)
        ok = await _collect(eng.submit(_prompt(5, 0), GREEDY))  # the thread lives on
        await eng.shutdown(0)
        return ok

    toks, _ = asyncio.run(main())
    assert toks == _alone(loaded, _prompt(5, 0))
