"""How many prompt tokens a scheduler step may compute while streams decode, from the measured cost of its forwards.

The decode rows of a step wait for its prompt chunk too, so the chunk's forward is held to about CHUNK_COST_RATIO
times the decode forward's time: while a long prompt is admitted, the running streams' gap stays near
(1 + ratio) times their gap without it, on any machine, model and batch size (a fixed tokens-per-row rule gave
2.75x on one CPU and more where the weight kernels cost more per row). Both costs are moving averages of measured
seconds: a decode forward, and a chunk forward per prompt token. The per-token cost falls as chunks grow (each
forward has a fixed part), so the size re-derived after each chunk converges to the size whose cost is the target.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CHUNK_COST_RATIO = 1.0  # a chunk forward costs at most about this many decode forwards: steps at ~2x a decode step
EMA_WEIGHT = 0.5  # weight of the newest measurement: chunk sizes settle in a few steps, one slow step is diluted
# Until both costs are measured (the first steps with decodes), and where forwards run asynchronously (CUDA: the
# clock would time the launch, not the work): at most this many prompt tokens per decoding stream, and at least the
# minimum, which every budget keeps so a prompt always advances.
CHUNK_TOKENS_PER_DECODE_ROW = 4
MIN_DECODE_CHUNK = 8


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new


class StepCost:
    """Measured seconds of the two kinds of forward a step runs, and the chunk size they allow."""

    def __init__(self, measured: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.measured, self.clock = measured, clock
        self.decode_s: float | None = None  # one step's decode forwards, all rows (moving average)
        self.token_s: float | None = None  # a chunk forward run beside decodes, per prompt token (moving average)

    def observe_decode(self, seconds: float) -> None:
        self.decode_s = _average(self.decode_s, seconds)

    def observe_chunk(self, seconds: float, tokens: int) -> None:
        """A chunk forward that ran in a step with decode rows (a prompt computed alone costs less per token)."""
        self.token_s = _average(self.token_s, seconds / max(tokens, 1))

    def chunk_tokens(self, num_decode: int) -> int:
        """Prompt tokens a step with num_decode decode rows may compute (before any cap on the step's tokens)."""
        if self.measured and self.decode_s is not None and self.token_s:
            tokens = round(CHUNK_COST_RATIO * self.decode_s / self.token_s)
        else:
            tokens = CHUNK_TOKENS_PER_DECODE_ROW * num_decode
        return max(MIN_DECODE_CHUNK, tokens)
