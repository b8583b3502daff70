"""Generation: one request run on the engine, as text deltas per sample (what both protocols stream).

Both APIs describe a request as a Job (prompt ids, SamplingParams, n, logprobs, stop strings, grammar). A
Generation submits it (refusals surface before any response starts: 400 for a prompt past the context, 503 for a
full queue), then turns the engine's token events into each sample's text: end-of-sequence tokens dropped,
multi-token characters held until complete (StreamDecoder), stop strings cut (StopText). A sample whose stop
string appeared is aborted alone (the others go on); when every sample is done, or the consumer goes away (a client
that disconnects), the request is aborted so its KV blocks return to the pool. Generations runs several prompts of
one request (OpenAI's `prompt` list) together, as one reply's choices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmcli.engine.async_engine import ConstraintFactory, QueueFull, TokenEvent
from llmcli.engine.sampling_params import SamplingParams, SettingError
from llmcli.errors import UserError
from llmcli.serve.errors import APIError
from llmcli.serve.metrics import Metrics
from llmcli.serve.model import ServedModel
from llmcli.serve.stop import StopText
from llmcli.tokenizer.stream import StreamDecoder


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k likeliest
    stops: list[str] = field(default_factory=list)
    constraint: ConstraintFactory | None = None
    prompt_param: str = "messages"  # the request field an over-long prompt is blamed on


@dataclass
class Delta:
    index: int
    text: str
    events: list[TokenEvent]  # the tokens since the previous delta of this sample (their logprobs)
    finish_reason: str | None = None  # "stop" | "length" on a sample's last delta


class _Sample:
    def __init__(self, gen: Generation):
        self.decoder = StreamDecoder(gen.tokenizer)
        self.stop = StopText(gen.job.stops)
        self.events: list[TokenEvent] = []
        self.tokens = 0
        self.last_t: float | None = None
        self.done = False  # no more deltas: the engine finished it, or its stop string appeared
        self.engine_done = False  # the engine sent its last event


class Generation:
    def __init__(self, model: ServedModel, metrics: Metrics, job: Job, arrived: float | None = None):
        self.llm, self.engine = model.require()
        self.tokenizer, self.eos = self.llm.tokenizer, self.llm.eos_token_ids
        self.metrics, self.job = metrics, job
        self.arrived = arrived if arrived is not None else time.perf_counter()
        self.first_t: float | None = None
        self.end_t: float | None = None
        self.samples = [_Sample(self) for _ in range(job.n)]
        self.handle = None

    def start(self) -> None:
        """Submit the job; APIError (400 / 503) when the engine refuses it."""
        try:
            self.llm.check_prompt(self.job.prompt_ids, self.job.params)
            self.handle = self.engine.submit(
                self.job.prompt_ids,
                self.job.params,
                n=self.job.n,
                logprobs=self.job.logprobs,
                constraint_factory=self.job.constraint,
            )
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", code="queue_full") from None
        except UserError as e:
            raise APIError(400, str(e), param=self.job.prompt_param, code="context_length_exceeded") from None

    @property
    def num_choices(self) -> int:
        return self.job.n

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return int(getattr(self.handle, "num_cached_tokens", 0) or 0)

    @property
    def completion_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Each sample's new text as its tokens arrive; every sample ends with a delta carrying finish_reason."""
        if self.handle is None:
            self.start()
        try:
            async for ev in self.handle:
                delta = self._take(ev)
                if delta is not None:
                    yield delta
                if all(s.done for s in self.samples):
                    break
        finally:
            self.end_t = time.perf_counter()
            if not all(s.engine_done for s in self.samples):
                self.handle.abort()  # a consumer that left (client disconnect), or stop strings: free the blocks

    def _timed(self, s: _Sample) -> None:
        """A token arrived for sample s: TTFT (the request's first) and inter-token latency (s's previous)."""
        now = time.perf_counter()
        if self.first_t is None:
            self.first_t = now
            self.metrics.ttft.observe(now - self.arrived)
        if s.last_t is not None:
            self.metrics.itl.observe(now - s.last_t)
        s.last_t = now

    def _take(self, ev: TokenEvent) -> Delta | None:
        s = self.samples[ev.index]
        s.engine_done = ev.finish_reason is not None
        if s.done:
            return None
        real = ev.token_id >= 0  # -1: an "abort" event (the sample left without a new token; server shutdown)
        if real:
            self._timed(s)
        s.tokens += real
        eos = ev.token_id in self.eos or not real
        if not eos:  # the end-of-turn token is no part of the reply: neither its text nor its logprobs
            s.events.append(ev)
        text = "" if eos else s.stop.push(s.decoder.push(ev.token_id))
        finish = "stop" if s.stop.stopped else None
        if finish is None and ev.finish_reason is not None:
            text += s.stop.push(s.decoder.flush())
            text += s.stop.flush()
            finish = "length" if ev.finish_reason == "length" and not s.stop.stopped else "stop"
        if not text and finish is None:
            return None
        s.done = finish is not None
        if s.stop.stopped and not s.engine_done and not all(x.done for x in self.samples):
            self.handle.abort(ev.index)  # this sample's stop string appeared: only it leaves the batch
        events, s.events = s.events, []
        return Delta(ev.index, text, events, finish)


class Generations:
    """Several prompts of one request, each its own Generation (engine request), all submitted before any reply
    and decoded in the same batches. Reads as one Generation whose choice p * n + j is sample j of prompt p
    (OpenAI's order); usage is the sum."""

    def __init__(self, gens: list[Generation]):
        self.gens = gens
        self.job, self.tokenizer = gens[0].job, gens[0].tokenizer  # the prompts share everything but their ids

    def start(self) -> None:
        """Submit every prompt; when one is refused (400 / 503) the ones already queued are aborted."""
        for i, g in enumerate(self.gens):
            try:
                g.start()
            except Exception:
                for started in self.gens[:i]:
                    started.handle.abort()
                raise

    @property
    def num_choices(self) -> int:
        return sum(g.num_choices for g in self.gens)

    @property
    def prompt_tokens(self) -> int:
        return sum(g.prompt_tokens for g in self.gens)

    @property
    def cached_tokens(self) -> int:
        return sum(g.cached_tokens for g in self.gens)

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.gens)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every prompt's deltas as they arrive, indexed by choice. Leaving early (a client gone) cancels the
        readers, which aborts every prompt's request."""
        queue: asyncio.Queue = asyncio.Queue()
        offsets = [sum(g.num_choices for g in self.gens[:i]) for i in range(len(self.gens))]

        async def read(g: Generation, offset: int) -> None:
            try:
                async for d in g.deltas():
                    queue.put_nowait(dataclasses.replace(d, index=offset + d.index))
                queue.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - re-raised to the reply's reader below
                queue.put_nowait(e)

        readers = [asyncio.ensure_future(read(g, o)) for g, o in zip(self.gens, offsets)]
        try:
            left = len(readers)
            while left:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                left -= item is None
                if item is not None:
                    yield item
        finally:
            for r in readers:
                r.cancel()


def settle_params(model: ServedModel, max_tokens: int | None, **fields) -> SamplingParams:
    """A request's sampling: llama.cpp's defaults, the model's generation_config.json, then the request's fields
    (None = not given; the reply may run to the context's end). 400 for a value SamplingParams refuses."""
    llm, _ = model.require()
    try:
        return SamplingParams.settle(model.path, default_max_tokens=llm.context_len, max_tokens=max_tokens, **fields)
    except SettingError as e:
        raise APIError(400, str(e), param=str(e).split(":")[0].removeprefix("invalid value for ")) from None
