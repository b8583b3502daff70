"""What the chat REPL talks to: the ChatBackend interface, and EngineBackend, which runs it on our engine.

    backend.stream(messages, settings) -> Iterator[str]   # text pieces of the reply, as they are generated
    backend.last_stats                                     # TurnStats of the reply being / last generated
    backend.count_tokens(messages), backend.context_length, backend.info()

The engine stays alive across turns, and each turn's prompt is the whole conversation through the chat template:
the engine's prefix cache finds the blocks of every earlier turn, so only the new message (and the tail block) is
computed; time to first token follows the new message, not the history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from llmcli.engine.block_manager import OutOfBlocks
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.speculative import plain_decode_tok_s
from llmcli.engine.text import TextStream, prompt_ids
from llmcli.errors import UserError
from llmcli.estimate import count_params
from llmcli.hub.inspect import model_params
from llmcli.units import format_count


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV blocks were reused from the prefix cache
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    elapsed_s: float = 0.0
    finish_reason: str | None = None
    speculative: dict | None = None  # SpecStats.to_dict() when a speculative decoder produced the reply


class ChatBackend(Protocol):
    context_length: int
    last_stats: TurnStats
    # what sets context_length when it is not the model's own context (e.g. "the KV cache"); "" otherwise. Read with
    # getattr: a scripted backend may leave it out
    context_limit: str

    def stream(self, messages: list[dict], settings: SamplingParams) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict]) -> int: ...

    def info(self) -> dict[str, str]: ...


class EngineBackend:
    """The chat backend on our engine. `streamer` defaults to the engine itself; anything with the same
    `.stream(prompt_ids, params)` works (speculative decoding: SpeculativeDecoder(engine, draft, ...)).
    `path` is the model's file or directory, so /show counts its parameters as `llm show` does."""

    def __init__(self, engine: LLMEngine, model_name: str, streamer=None, path: Path | None = None):
        if engine.tokenizer is None:
            raise UserError("this model has no tokenizer, so it cannot chat")
        self.engine, self.model_name, self.path = engine, model_name, path
        self.streamer = streamer if streamer is not None else engine
        self.context_length = engine.context_len  # a benchmark may lower it (never raise it: the engine refuses)
        self.context_limit = kv_limit_words(engine)
        self.last_stats = TurnStats()
        self.last_prompt_ids: list[int] = []
        # the last messages prompt_ids ran on (copied), and their ids
        self._counted: tuple[list[dict] | None, list[int]] = (None, [])

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """prompt_ids, kept for the last messages: the session counts a turn's whole prompt (fitting the context)
        right before it streams it, and that prompt is the whole conversation."""
        if messages != self._counted[0]:
            self._counted = ([dict(m) for m in messages], prompt_ids(self.engine.tokenizer, messages))
        return self._counted[1]

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self._prompt_ids(messages))

    def stream(self, messages: list[dict], settings: SamplingParams) -> Iterator[str]:
        ids = self.last_prompt_ids = self._prompt_ids(messages)
        room = self.context_length - len(ids)
        if room < 1:
            raise UserError(f"the prompt ({len(ids)} tokens) does not fit the context ({self.context_length})")
        params = replace(settings, max_tokens=min(settings.max_tokens, room))
        stats = self.last_stats = TurnStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        text = TextStream(self.engine.tokenizer, self.engine.eos_token_ids)
        events = self.streamer.stream(ids, params)
        try:
            yield from text.pieces(events)
        except OutOfBlocks:  # we size replies to fit, so only a pool shared with other work gets here
            raise UserError("the KV cache is full; raise --kv-cache-gib or /clear the conversation") from None
        finally:
            events.close()  # an interrupted reply releases its sequence now (its full blocks stay cached)
            _take_stats(stats, text)
            stats.elapsed_s = time.perf_counter() - t0

    def plain_decode_tok_s(self) -> float | None:
        """Plain (non-speculative) decode speed after the last prompt, measured on demand for /stats' speed-up."""
        if self.streamer is self.engine or not self.last_prompt_ids:
            return None
        try:
            return plain_decode_tok_s(self.engine, self.last_prompt_ids)
        except OutOfBlocks:  # the pool is full of this conversation: no room for a measuring sequence
            return None

    def parameters(self) -> int:
        """The model's parameter count as `llm show` reports it: the checkpoint's tensors where they are not packed,
        else the architecture's count. Never the loaded modules' elements: a quantized linear packs two 4-bit
        weights in a byte and keeps its scales apart, so its numel() is neither."""
        if self.path is not None:
            total, _ = model_params(self.path, self.engine.config)
            if total:
                return total
        return int(count_params(self.engine.config).total)

    def info(self) -> dict[str, str]:
        c, e = self.engine.config, self.engine
        out = {
            "model": self.model_name,
            "architecture": c.family,
            "parameters": format_count(self.parameters()),
            "layers": str(c.num_layers),
            "hidden size": str(c.hidden_size),
            "attention heads": f"{c.num_heads} (kv {c.num_kv_heads})",
        }
        if c.num_experts:
            out["experts"] = f"{c.num_experts} ({c.num_experts_per_tok} per token)"
        out.update(
            {
                "vocabulary": str(c.vocab_size),
                "context length": f"{self.context_length} tokens (model {c.max_position_embeddings}, "
                f"KV pool {e.pool_tokens})",
                "device": str(e.device),
                "dtype": str(e.dtype).replace("torch.", ""),
                "kv cache": f"{e.kv_dtype or 'auto'} ({e.runner.kv_storage})".replace("torch.", ""),
            }
        )
        if self.streamer is not e:
            out["speculative"] = getattr(self.streamer, "method", type(self.streamer).__name__)
        return out


def kv_limit_words(engine: LLMEngine) -> str:
    """Why the engine's context is shorter than the model's, or "" when it is not: the KV budget (--kv-cache-gib)
    at the cache's format (--kv-dtype) is the limit, so the user knows which flag buys a longer conversation."""
    model = engine.config.max_position_embeddings
    if engine.context_len >= model:
        return ""
    kv = engine.kv_dtype or "auto"
    return (
        f"the KV cache ({engine.pool_tokens:,} tokens at --kv-dtype {kv}; the model's context is {model:,}: raise "
        "--kv-cache-gib or use --kv-dtype int8)"
    )


def _take_stats(stats: TurnStats, text: TextStream) -> None:
    """The turn's counters and timings from the generation stats of the last token seen."""
    s = text.stats
    if s is None:
        return
    stats.cached_tokens, stats.generated_tokens = s.cached_prompt_tokens, s.generated_tokens
    stats.ttft_s, stats.decode_tok_s, stats.finish_reason = s.ttft_s, s.decode_tok_s, s.finish_reason
    if hasattr(s, "speculative"):
        stats.speculative = s.speculative.to_dict()
