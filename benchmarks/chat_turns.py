"""Multi-turn chat cost: with prefix caching, time to first token follows the new message, not the history.

    .venv/bin/python benchmarks/chat_turns.py [MODEL] [--turns 10] [--max-tokens 64] [--device cpu] [--json]

Plays a fixed 10-turn conversation through the same backend `llm chat` uses (one engine kept alive, greedy
replies). Then it replays the very same prompts with the prefix cache emptied before each turn, so both columns
time identical prompts. Per turn: prompt tokens, tokens reused from the cache, TTFT with and without caching.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "Hi! Can you help me plan a short trip to Paris?",
    "What are three museums I should not miss there?",
    "Which of them is best for a rainy afternoon, and why?",
    "How do I get from the airport to the city centre?",
    "What is a typical breakfast in France?",
    "Give me two phrases in French for ordering coffee.",
    "Is it better to visit in spring or in autumn?",
    "Suggest a day trip outside the city.",
    "How much time should I plan for that day trip?",
    "Summarize our plan in three short bullet points.",
]


def drop_prefix_cache(engine) -> None:
    """Forget every cached block key, so the next prompt is computed from scratch (caching off)."""
    bm = engine.block_manager
    bm.hash_to_block.clear()
    for b in bm.blocks:
        if b.ref_count == 0:
            b.hash, b.token_ids = None, ()


def ttft_of(backend, messages, settings) -> tuple[int, int, float]:
    """Prompt tokens, reused tokens and TTFT (s) of one prompt, stopping after the first token."""
    stream = backend.stream(messages, replace(settings, max_tokens=1))
    for _ in stream:
        pass
    s = backend.last_stats
    return s.prompt_tokens, s.cached_tokens, s.ttft_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--turns", type=int, default=len(QUESTIONS))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from llmcli.chat.backend import EngineBackend
    from llmcli.chat.conversation import Conversation
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.hub.resolve import resolve_model

    path = resolve_model(args.model)
    engine = LLMEngine.load(path, device=args.device, dtype=args.dtype)
    backend = EngineBackend(engine, path.name)
    settings = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    ttft_of(backend, [{"role": "user", "content": "warm up"}], settings)  # first-call overheads out of turn 1
    drop_prefix_cache(engine)

    # 1) the chat as `llm chat` runs it: prefix caching on, the whole history re-sent each turn
    conv = Conversation("You are a helpful travel assistant.")
    prompts, rows = [], []
    for q in QUESTIONS[: args.turns]:
        conv.messages.append({"role": "user", "content": q})
        prompts.append(conv.for_template())
        reply = "".join(backend.stream(conv.for_template(), settings))
        s = backend.last_stats
        rows.append(
            {
                "turn": len(rows) + 1,
                "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.cached_tokens,
                "new_tokens": s.prompt_tokens - s.cached_tokens,
                "ttft_ms": s.ttft_s * 1000,
                "reply_tokens": s.generated_tokens,
            }
        )
        conv.messages.append({"role": "assistant", "content": reply})

    # 2) the same prompts with caching off
    for row, msgs in zip(rows, prompts):
        drop_prefix_cache(engine)
        n, reused, ttft = ttft_of(backend, msgs, settings)
        assert n == row["prompt_tokens"] and reused == 0
        row["ttft_nocache_ms"] = ttft * 1000
    drop_prefix_cache(engine)

    if args.json:
        print(json.dumps({"model": path.name, "device": str(engine.device), "turns": rows}))
        return
    print(
        f"{path.name}  device={engine.device}  dtype={str(engine.dtype).replace('torch.', '')}  "
        f"greedy replies of up to {args.max_tokens} tokens"
    )
    print(f"{'turn':>4}{'prompt':>8}{'reused':>8}{'new':>6}{'TTFT ms':>10}{'no cache ms':>13}{'speedup':>9}")
    for r in rows:
        print(
            f"{r['turn']:>4}{r['prompt_tokens']:>8}{r['reused_tokens']:>8}{r['new_tokens']:>6}"
            f"{r['ttft_ms']:>10.1f}{r['ttft_nocache_ms']:>13.1f}{r['ttft_nocache_ms'] / r['ttft_ms']:>8.1f}x"
        )


if __name__ == "__main__":
    main()
