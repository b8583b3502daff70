"""A sequence being generated, and the sampling parameters that go with it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """temperature 0 = greedy. top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 disable those filters."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


_ids = itertools.count()


@dataclass
class Sequence:
    """Token ids (prompt + generated) and where its keys/values live in the paged cache.

    num_computed: tokens whose K/V are already in the cache (the last sampled token is not, until the next step).
    num_cached_prompt: prompt tokens found in the prefix cache instead of being computed.
    """
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos / stop token) | "length"
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
