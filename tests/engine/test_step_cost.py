"""The chunk budget while streams decode: derived from the measured forwards (a synthetic clock makes them exact),
converging to the chunk whose cost is one decode forward, and the scheduler's output unchanged by it."""

from __future__ import annotations

import pytest
from conftest import random_ids, tiny_engine

from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.scheduler import Request, Scheduler
from llmcli.engine.step_cost import CHUNK_COST_RATIO, CHUNK_TOKENS_PER_DECODE_ROW, MIN_DECODE_CHUNK, StepCost

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fallback_before_measurements_and_when_not_measured():
    assert StepCost().chunk_tokens(6) == max(MIN_DECODE_CHUNK, CHUNK_TOKENS_PER_DECODE_ROW * 6)
    assert StepCost().chunk_tokens(1) == MIN_DECODE_CHUNK
    cost = StepCost(measured=False)
    cost.observe_decode(1.0)
    cost.observe_chunk(1.0, 1000)
    assert cost.chunk_tokens(10) == CHUNK_TOKENS_PER_DECODE_ROW * 10


def test_converges_to_chunk_costing_one_decode_forward():
    """Chunks cost fixed + per_token * c: re-deriving c from each measurement settles where the chunk costs
    CHUNK_COST_RATIO decode forwards, c* = (ratio * decode - fixed) / per_token (closed form)."""
    decode, fixed, per_token = 0.040, 0.010, 0.0005
    cost = StepCost()
    cost.observe_decode(decode)
    c = 200  # the first chunk, far too large
    for _ in range(40):
        cost.observe_chunk(fixed + per_token * c, c)
        c = cost.chunk_tokens(8)
    assert abs(c - (CHUNK_COST_RATIO * decode - fixed) / per_token) <= 1
    assert c >= MIN_DECODE_CHUNK


def test_minimum_keeps_a_prompt_moving():
    cost = StepCost()
    cost.observe_decode(0.001)
    cost.observe_chunk(1.0, 10)  # a chunk token costs 100 decode forwards
    assert cost.chunk_tokens(4) == MIN_DECODE_CHUNK


class SyntheticClock:
    """Advanced by the runner's forwards: a decode forward costs `decode`, a chunk `fixed + per_token * tokens`."""

    def __init__(self, decode: float, fixed: float, per_token: float):
        self.now, self.decode, self.fixed, self.per_token = 0.0, decode, fixed, per_token

    def __call__(self) -> float:
        return self.now

    def wrap(self, forward):
        def timed(batch):
            tokens = sum(e - s for _, s, e in batch)
            decode = all(e - s == 1 for _, s, e in batch) and len(batch) > 1
            self.now += self.decode if decode else self.fixed + self.per_token * tokens
            return forward(batch)

        return timed


def test_scheduler_sizes_chunks_from_measured_costs(tiny_model):
    """3 streams decode while a 300-token prompt arrives: once measured, its chunks cost about one decode forward,
    and every request's greedy tokens equal those of a run with the fixed rule (chunking does not change them)."""
    loaded = load_model(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    long_params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs, chunk_sizes = [], []
    for measured in (True, False):
        sched = Scheduler(tiny_engine(loaded, num_blocks=1024), max_num_seqs=8, max_num_batched_tokens=256)
        clock = SyntheticClock(decode=0.030, fixed=0.006, per_token=0.001)
        sched.cost = StepCost(measured=measured, clock=clock)
        chunks = []
        real = sched.runner.forward
        sched.runner.forward = clock.wrap(
            lambda b, real=real, chunks=chunks: chunks.append(b[0][2] - b[0][1]) or real(b)
        )
        reqs = [Request(random_ids(9, i), params) for i in range(3)]
        for r in reqs:
            sched.add(r)
        for _ in range(3):  # the short prompts in, a few decode steps
            sched.step()
        reqs.append(Request(random_ids(300, 99), long_params))
        sched.add(reqs[-1])
        out = {i: [] for i in range(len(reqs))}
        chunks.clear()
        while sched.has_work():
            for req, ev in sched.step():
                if ev.token_id >= 0:
                    out[reqs.index(req)].append(ev.token_id)
        outputs.append(out)
        chunk_sizes.append([c for c in chunks if c > 1])
    target = (CHUNK_COST_RATIO * 0.030 - 0.006) / 0.001  # 24 tokens
    settled = chunk_sizes[0][6:-1]  # after the first measurements, before the prompt's remainder
    assert settled and all(abs(c - target) <= 1 for c in settled), chunk_sizes[0]
    assert chunk_sizes[1][0] == CHUNK_TOKENS_PER_DECODE_ROW * 3  # the fixed rule: 4 per decoding stream
    assert outputs[0] == outputs[1]
