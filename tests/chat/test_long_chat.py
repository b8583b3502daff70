"""A chat that outgrows its context, through the backend and session `llm chat` uses, on a small random llama with a
byte tokenizer (deterministic, fast): the oldest turns go in one large chunk, so the prompts of the turns that follow
share a long prefix that the engine's KV cache reuses, instead of the whole history being re-processed every turn."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import write_byte_tokenizer
from rich.console import Console

from llmcli.chat.backend import EngineBackend
from llmcli.chat.session import ChatSession
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams

BLOCK = 16
CONTEXT = 2048
CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(directory) -> None:
    """The tiny models' byte tokenizer and a small chat template."""
    write_byte_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-llama") / "m"
    shutil.copytree(tiny_model("llama", max_position_embeddings=CONTEXT), d)
    byte_tokenizer(d)
    return LLMEngine.load(d, device="cpu")


def play(engine: LLMEngine, keep_after_drop: float | None, turns: int) -> list[dict]:
    """Greedy turns of 16-token replies; per turn the prompt, cached and previous prompt's token counts, and whether
    the prompt starts with the previous turn's prompt."""
    engine.block_manager.hash_to_block.clear()  # each play starts with an empty prefix cache
    for b in engine.block_manager.blocks:
        if b.ref_count == 0:
            b.hash, b.token_ids = None, ()
    backend = EngineBackend(engine, "tiny")
    assert backend.context_length == CONTEXT  # the model's context (the KV pool is larger)
    s = ChatSession(
        backend,
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        "You are a helpful assistant.",
        console=Console(file=io.StringIO(), color_system=None),
        interactive=False,
    )
    if keep_after_drop is not None:
        s.keep_after_drop = keep_after_drop
    rows, prev = [], None
    for i in range(turns):
        s.handle(f"Tell me something about the number {i}.")
        ids, st = backend.last_prompt_ids, backend.last_stats
        kept = prev is not None and ids[: len(prev)] == prev
        rows.append({"prompt": st.prompt_tokens, "cached": st.cached_tokens, "kept": kept, "prev": len(prev or [])})
        prev = list(ids)
    return rows


def test_prefix_survives_many_turns_after_the_overflow(engine, one_thread):
    turns = 48
    rows = play(engine, None, turns)
    breaks = [i for i, r in enumerate(rows[1:], 1) if not r["kept"]]
    first = breaks[0]
    assert 10 <= first <= turns - 24, breaks  # the chat outgrew its context well before the end
    assert all(r["prompt"] <= CONTEXT - 16 for r in rows)
    # one drop per chunk: many turns of an unchanged prefix between two drops
    assert 2 <= len(breaks) <= 5 and all(y - x >= 6 for x, y in zip(breaks, breaks[1:])), breaks
    for r in rows[1:]:
        if r["kept"]:  # every full block of the previous turn's prompt is found in the cache
            assert r["cached"] >= r["prev"] // BLOCK * BLOCK, r
        else:  # a drop: down to half the context
            assert r["prompt"] <= CONTEXT // 2, r
    after = rows[first:]
    reused = sum(r["cached"] for r in after) / sum(r["prompt"] for r in after)
    assert reused >= 0.75, reused

    # the same chat dropping only what the next reply needs changes its prefix, and re-processes it, every turn
    old = play(engine, 1.0, turns)
    assert [i for i, r in enumerate(old[1:], 1) if not r["kept"]] == list(range(first, turns))
    old_after = old[first:]
    assert sum(r["cached"] for r in old_after) / sum(r["prompt"] for r in old_after) < 0.2
