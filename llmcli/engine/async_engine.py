"""AsyncEngine: one thread owns the model and runs scheduler steps; asyncio callers submit requests and read
their tokens as they are sampled (the bridge `llm serve` is built on).

    engine = AsyncEngine(LLMEngine.load(path), max_num_seqs=16, max_num_batched_tokens=256, max_queue=64)
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(...), n=1, logprobs=None, constraint_factory=None)
    async for ev in handle:          # TokenEvent, in sampling order; ends when every sample has finished
        ...
    handle.abort()                   # thread-safe; the samples leave the batch at the next step, blocks freed
    engine.stats()                   # EngineStats, for /metrics and /api/ps
    await engine.shutdown(grace_s=5) # stop accepting, finish in-flight requests within grace_s, abort the rest

Contract shared by the engine side (scheduler, this module) and the server side (llmcli/serve): the names and
fields below are what llmcli.serve codes against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class QueueFull(RuntimeError):
    """More requests are waiting than max_queue allows (the server answers 503)."""


class TokenConstraint(Protocol):
    """Grammar-constrained decoding for one sample (llmcli.serve.grammar implements it with llguidance)."""

    def fill_mask(self, logits: torch.Tensor) -> None:
        """Set the entries of this sample's [vocab] logits row that the grammar forbids to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance the grammar by the sampled token."""

    def is_finished(self) -> bool:
        """The grammar is complete: the sample ends (finish_reason "stop")."""


@dataclass
class TokenEvent:
    index: int  # which of the request's n samples
    token_id: int
    logprob: float | None = None  # log-softmax of the raw model logits at the sampled id (when logprobs asked)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the `logprobs` most likely (id, logprob)
    finish_reason: str | None = None  # set on a sample's last event: "stop" | "length" | "abort"


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_tokens: int = 0  # cumulative: prompt tokens found in the prefix cache
    prompt_tokens: int = 0  # cumulative: prompt tokens of admitted requests
    generation_tokens: int = 0  # cumulative
    preemptions: int = 0  # cumulative


ConstraintFactory = Callable[[], TokenConstraint]
