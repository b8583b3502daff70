"""The serving scheduler: batched greedy output equals each request run alone (mixed lengths, chunked prefill,
preemption, n samples sharing prompt blocks), aborts free blocks, penalties / logprobs / constraints."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_engine

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampler import apply_additive_penalties
from llmcli.engine.sampling_params import SamplingParams, SettingError
from llmcli.engine.scheduler import Request, Scheduler
from llmcli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: sliding window 16
def loaded(request, tiny_model):
    return load_model(tiny_model(request.param))


def _alone(loaded, prompt, params=GREEDY) -> list[int]:
    """The reference: a fresh engine, the request by itself through LLMEngine.stream (batch-1 steps, no scheduler)."""
    return [ev.token_id for ev in tiny_engine(loaded).stream(prompt, params)]


def _drain(sched: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> dict:
    """Step until idle; tokens and finish reasons per (request index, sample index)."""
    out: dict = {}
    for _ in range(max_steps):
        if not sched.has_work():
            break
        for req, ev in sched.step():
            toks, _ = out.get((reqs.index(req), ev.index), ([], None))
            if ev.token_id >= 0:
                toks = [*toks, ev.token_id]
            out[(reqs.index(req), ev.index)] = (toks, ev.finish_reason)
    assert not sched.has_work()
    return out


def _run(sched: Scheduler, prompts, params=GREEDY, n=1) -> tuple[list[Request], dict]:
    reqs = [Request(p, params, n=n) for p in prompts]
    for r in reqs:
        sched.add(r)
    return reqs, _drain(sched, reqs)


def test_batched_chunked_equals_alone(loaded):
    prompts = [random_ids(n, n) for n in (5, 37, 11, 60, 2)]
    eng = tiny_engine(loaded)
    sched = Scheduler(eng, max_num_seqs=3, max_num_batched_tokens=16)  # 60 tokens: 4 chunks, cap 3 running
    reqs, out = _run(sched, prompts)
    for i, p in enumerate(prompts):
        assert out[(i, 0)] == (_alone(loaded, p), "length")
    assert eng.block_manager.num_free == 512
    assert sched.counters.prompt_tokens == sum(map(len, prompts))
    assert sched.counters.generation_tokens == 12 * len(prompts)


def test_decode_split_by_length_equals_alone(loaded):
    """Rows of very different lengths decode in separate forwards (a low split threshold): same tokens."""
    prompts = [random_ids(n, 20 + n) for n in (70, 4, 66, 9, 3)]
    sched = Scheduler(tiny_engine(loaded))
    sched.pad_split_tokens = 8
    forwards = []
    real = sched.runner.forward
    sched.runner.forward = lambda batch: forwards.append(len(batch)) or real(batch)
    _, out = _run(sched, prompts)
    assert max(forwards) < len(prompts) and forwards.count(2) + forwards.count(3) > 0
    for i, p in enumerate(prompts):
        assert out[(i, 0)] == (_alone(loaded, p), "length")


def test_prefix_cache_across_requests(loaded):
    eng = tiny_engine(loaded)
    sched = Scheduler(eng)
    shared = random_ids(24, 1)
    (first,), _ = _run(sched, [shared + [7]])
    (second,), out = _run(sched, [shared + [9, 9]])
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 24  # six full 4-token blocks
    assert sched.counters.prefix_cache_hit_tokens == 24
    assert out[(0, 0)][0] == _alone(loaded, shared + [9, 9])


def test_preemption_recomputes_without_loss(loaded):
    prompts = [random_ids(n, 10 + n) for n in (9, 14, 6, 20)]
    eng = tiny_engine(loaded, num_blocks=16)  # 64 slots; the four need 4 * ~8 blocks at their ends
    sched = Scheduler(eng, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    _, out = _run(sched, prompts, params)
    assert sched.counters.preemptions > 0
    for i, p in enumerate(prompts):
        assert out[(i, 0)] == (_alone(loaded, p, params), "length")
    assert eng.block_manager.num_free == 16


def test_n_samples_share_prompt_blocks(loaded):
    eng = tiny_engine(loaded)
    sched = Scheduler(eng)
    prompt = random_ids(18, 3)  # 4 full blocks and a shared partial one (copy-on-write on first decode)
    req = Request(prompt, GREEDY, n=3)
    sched.add(req)
    first = {ev.index: ev.token_id for _, ev in sched.step()}  # prompt done, forked, first tokens sampled
    blocks = [s.block_table for s in req.samples]
    assert blocks[0][:4] == blocks[1][:4] == blocks[2][:4]
    assert eng.block_manager.blocks[blocks[0][0]].ref_count == 3
    out = _drain(sched, [req])
    want = _alone(loaded, prompt)
    assert [([first[i], *out[(0, i)][0]], out[(0, i)][1]) for i in range(3)] == [(want, "length")] * 3
    assert eng.block_manager.num_free == 512


def test_n_seeded_samples_match_seeded_runs(loaded):
    prompt = random_ids(13, 4)
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    sched = Scheduler(tiny_engine(loaded))
    _, out = _run(sched, [prompt], params, n=3)
    for i in range(3):
        seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234 + i, max_tokens=10, ignore_eos=True)
        assert out[(0, i)][0] == _alone(loaded, prompt, seeded)
    assert len({tuple(out[(0, i)][0]) for i in range(3)}) > 1  # distinct draws


def test_abort_frees_blocks(loaded):
    eng = tiny_engine(loaded)
    sched = Scheduler(eng)
    baseline = eng.block_manager.num_free
    reqs = [Request(random_ids(30, 5), GREEDY, n=2), Request(random_ids(9, 6), GREEDY)]
    for r in reqs:
        sched.add(r)
    for _ in range(3):
        sched.step()
    assert eng.block_manager.num_free < baseline
    events = sched.abort(reqs[0], 1) + sched.abort(reqs[0]) + sched.abort(reqs[1])
    assert [(ev.index, ev.finish_reason) for _, ev in events] == [(1, "abort"), (0, "abort"), (0, "abort")]
    assert all(r.finished for r in reqs) and not sched.has_work()
    assert eng.block_manager.num_free == baseline


def test_abort_sample_before_fork(loaded):
    sched = Scheduler(tiny_engine(loaded), max_num_batched_tokens=8)
    prompt = random_ids(30, 7)
    req = Request(prompt, GREEDY, n=3)
    sched.add(req)
    sched.step()  # a first chunk only
    assert [ev.index for _, ev in sched.abort(req, 0)] == [0]
    out = _drain(sched, [req])
    want = _alone(loaded, prompt)
    assert out[(0, 1)] == out[(0, 2)] == (want, "length")
    assert req.finished


def test_logprobs_are_log_softmax_of_raw_logits(loaded):
    eng = tiny_engine(loaded)
    prompt = random_ids(10, 8)
    ref = tiny_engine(loaded)
    seq = ref.add(prompt)
    want = ref.forward_logits([seq])[0].float().log_softmax(-1)
    sched = Scheduler(eng)
    req = Request(prompt, SamplingParams(temperature=0, max_tokens=1), logprobs=5)
    sched.add(req)
    ((_, ev),) = sched.step()
    assert ev.token_id == int(want.argmax())
    assert ev.logprob == pytest.approx(float(want.max()), abs=1e-4)
    top = want.topk(5)
    assert [t for t, _ in ev.top_logprobs] == top.indices.tolist()
    assert [v for _, v in ev.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_additive_penalties_closed_form():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    outputs = [[3, 3, 5], []]
    got = apply_additive_penalties(logits.clone(), outputs, [0.5, 0.5], [1.5, 1.5])
    want = logits.clone()
    want[0, 3] -= 2 * 0.5 + 1.5
    want[0, 5] -= 1 * 0.5 + 1.5
    assert torch.equal(got, want)
    with pytest.raises(SettingError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)


def test_presence_penalty_changes_greedy_choice(loaded):
    """Presence penalty in the batched path: the first token (nothing generated yet) is the plain one, the reply
    then differs from the unpenalized one (a repeat costs 2 logits)."""
    prompt = random_ids(8, 9)
    sched = Scheduler(tiny_engine(loaded))
    _, out = _run(sched, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=2))
    plain = _alone(loaded, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    toks = out[(0, 0)][0]
    assert toks != plain
    assert toks[0] == plain[0]  # nothing generated yet: no penalty on the first token


class EvenTokens:
    """A test grammar: even ids only, finished after three tokens."""

    def __init__(self):
        self.seen: list[int] = []

    def fill_mask(self, logits: torch.Tensor) -> None:
        logits[1::2] = float("-inf")

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)

    def is_finished(self) -> bool:
        return len(self.seen) >= 3


def test_constraint_masks_and_finishes(loaded):
    sched = Scheduler(tiny_engine(loaded))
    made: list[EvenTokens] = []

    def factory() -> EvenTokens:
        made.append(EvenTokens())
        return made[-1]

    params = SamplingParams(temperature=1.0, seed=5, max_tokens=20)
    req = Request(random_ids(7, 11), params, n=2, constraint_factory=factory)
    sched.add(req)
    out = _drain(sched, [req])
    assert len(made) == 2
    for i in range(2):
        toks, reason = out[(0, i)]
        assert reason == "stop" and len(toks) == 3 and all(t % 2 == 0 for t in toks)
        assert made[i].seen == toks


def test_refusals(loaded):
    eng = tiny_engine(loaded, num_blocks=8)  # context: 32 tokens
    sched = Scheduler(eng)
    with pytest.raises(UserError, match="32"):
        sched.add(Request(random_ids(40, 0), GREEDY))
    with pytest.raises(UserError, match="logprobs"):
        sched.add(Request(random_ids(4, 0), GREEDY, logprobs=21))


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf):
    return load_model(smollm2_gguf, dequantize=True)


def test_smollm2_batched_equals_alone(smollm2_fp32):
    """The real model, dequantized to fp32: four mixed-length prompts batched with chunked prefill."""
    model, config = smollm2_fp32
    prompts = [random_ids(n, n) for n in (3, 40, 17, 70)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng = LLMEngine(model, config, num_blocks=64)
    sched = Scheduler(eng, max_num_seqs=4, max_num_batched_tokens=32)
    _, out = _run(sched, prompts, params)
    for i, p in enumerate(prompts):
        alone = [ev.token_id for ev in LLMEngine(model, config, num_blocks=64).stream(p, params)]
        assert out[(i, 0)][0] == alone


def test_smollm2_preemption_fork_abort(smollm2_fp32):
    """The real model: a pool too small for four streams (preemptions), n=3 over shared prompt blocks, an abort
    that returns the pool to its baseline."""
    model, config = smollm2_fp32
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [random_ids(n, 30 + n) for n in (20, 45, 9, 33)]
    eng = LLMEngine(model, config, num_blocks=8)  # 128 slots of 16; the requests end at ~250 tokens (16 blocks)
    sched = Scheduler(eng, max_num_seqs=6, max_num_batched_tokens=64)
    reqs = [Request(p, params) for p in prompts[:3]] + [Request(prompts[3], params, n=3)]
    for r in reqs:
        sched.add(r)
    out = _drain(sched, reqs)
    assert sched.counters.preemptions > 0
    for i, p in enumerate(prompts):
        alone = [ev.token_id for ev in LLMEngine(model, config, num_blocks=64).stream(p, params)]
        for j in range(reqs[i].n):
            assert out[(i, j)] == (alone, "length")
    assert eng.block_manager.num_free == 8
    victim = Request(prompts[1], params, n=2)
    sched.add(victim)
    sched.step()
    sched.step()
    assert eng.block_manager.num_free < 8
    sched.abort(victim)
    assert eng.block_manager.num_free == 8 and not sched.has_work()
