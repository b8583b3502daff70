"""A sequence being generated: its token ids, sampling parameters and place in the paged KV cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from llmcli.engine.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)  # identity: the scheduler finds and removes sequences in its queues
class Sequence:
    """Token ids (prompt + generated) and where its keys/values live in the paged cache.

    num_computed: tokens whose K/V are already in the cache (the last sampled token is not, until the next step).
    num_cached_prompt: prompt tokens found in the prefix cache instead of being computed.
    block_tables: one block table per layer group (llmcli.engine.block_manager); block_table is group 0's.
    block_hashes: the prefix-cache key of each full block whose K/V are cached.
    """

    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_tables: list[list[int]] = field(default_factory=lambda: [[]])
    block_hashes: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos / stop token / grammar done) | "length" | "abort"
    generator: torch.Generator | None = field(default=None, repr=False)
    # Served requests (llmcli.engine.scheduler): which of the request's n samples this is, the request it belongs
    # to, and its grammar constraint (a TokenConstraint) when the request has one.
    index: int = 0
    request: object = field(default=None, repr=False)
    constraint: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, table: list[int]) -> None:
        self.block_tables[0] = table

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
