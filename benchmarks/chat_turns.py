"""Multi-turn chat cost: with prefix caching, time to first token follows the new message, not the history.

    .venv/bin/python benchmarks/chat_turns.py [MODEL] [--turns 10] [--max-tokens 64] [--device cpu] [--json]
    .venv/bin/python benchmarks/chat_turns.py [MODEL] --overflow [--context 512] [--turns 24] [--max-tokens 32]

Plays a fixed 10-turn conversation through the same backend `llm chat` uses (one engine kept alive, greedy
replies). Then it replays the very same prompts with the prefix cache emptied before each turn, so both columns
time identical prompts. Per turn: prompt tokens, tokens reused from the cache, TTFT with and without caching.

--overflow: a conversation that outgrows the context (capped at --context tokens so it runs in a minute or two on a
CPU), played through the chat session itself twice: dropping the oldest turns down to half the context when it
overflows (what `llm chat` does), and dropping only what the next reply needs (the policy before, kept here only).
Per turn and policy: prompt tokens, tokens reused from the prefix cache, TTFT, and a * where turns were dropped.
"""

from __future__ import annotations

import argparse
import io
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


def overflow_turns(backend, settings, keep_after_drop: float, turns: int) -> list[dict]:
    """The session's turns of a conversation past its context; the cache is emptied first."""
    from rich.console import Console

    from llmcli.chat.session import ChatSession

    drop_prefix_cache(backend.engine)
    err = io.StringIO()
    session = ChatSession(
        backend,
        settings,
        "You are a helpful travel assistant.",
        console=Console(file=io.StringIO(), color_system=None),
        err=Console(file=err, color_system=None, width=1000),
        interactive=False,
    )
    session.keep_after_drop = keep_after_drop
    rows = []
    for i in range(turns):
        notices = len(err.getvalue())
        session.handle(QUESTIONS[i % len(QUESTIONS)])
        s = backend.last_stats
        rows.append(
            {
                "turn": i + 1,
                "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.cached_tokens,
                "ttft_ms": s.ttft_s * 1000,
                "dropped": "outgrew" in err.getvalue()[notices:],
            }
        )
    return rows


def overflow(args, engine, backend, settings, path) -> None:
    from llmcli.chat.conversation import KEEP_AFTER_DROP

    backend.context_length = min(backend.context_length, args.context)  # a smaller model context, benchmark only
    policies = {"chunk": KEEP_AFTER_DROP, "minimal": 1.0}
    runs = {name: overflow_turns(backend, settings, keep, args.turns) for name, keep in policies.items()}
    if args.json:
        print(json.dumps({"model": path.name, "device": str(engine.device), "context": backend.context_length, **runs}))
        return
    print(
        f"{path.name}  device={engine.device}  context {backend.context_length} tokens  greedy replies of up to "
        f"{args.max_tokens} tokens;  chunk: drop down to {KEEP_AFTER_DROP:.0%} of the context (llm chat),  "
        "minimal: drop only what the next reply needs  (* = turns dropped)"
    )
    print(f"{'':>4}{'chunk':^28}|{'minimal':^28}")
    head = f"{'prompt':>8}{'reused':>8}{'TTFT ms':>10} "
    print(f"{'turn':>4}{head}{' ':>1}|{head}")
    for a, b in zip(runs["chunk"], runs["minimal"]):
        cells = [
            f"{r['prompt_tokens']:>8}{r['reused_tokens']:>8}{r['ttft_ms']:>10.1f}{'*' if r['dropped'] else ' '} "
            for r in (a, b)
        ]
        print(f"{a['turn']:>4}{cells[0]}|{cells[1]}")
    for name, rows in runs.items():
        first_drop = next((r["turn"] for r in rows if r["dropped"]), len(rows) + 1)
        past = [r for r in rows if r["turn"] >= first_drop]
        if past:
            reused = sum(r["reused_tokens"] for r in past) / sum(r["prompt_tokens"] for r in past)
            ttft = sum(r["ttft_ms"] for r in past) / len(past)
            print(
                f"{name}: from the first drop (turn {past[0]['turn']}) on, {reused:.0%} of prompt tokens reused, "
                f"mean TTFT {ttft:.1f} ms, {sum(r['dropped'] for r in past)} drops in {len(past)} turns"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--turns", type=int, default=None, help=f"default {len(QUESTIONS)}, with --overflow 24")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64, with --overflow 32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--overflow", action="store_true", help="a conversation that outgrows the context")
    ap.add_argument("--context", type=int, default=512, help="--overflow: the context, in tokens")
    args = ap.parse_args()

    from llmcli.chat.backend import EngineBackend
    from llmcli.chat.conversation import Conversation
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.hub.resolve import resolve_model

    if args.turns is None:
        args.turns = 24 if args.overflow else len(QUESTIONS)
    if args.max_tokens is None:
        args.max_tokens = 32 if args.overflow else 64
    path = resolve_model(args.model)
    engine = LLMEngine.load(path, device=args.device, dtype=args.dtype)
    backend = EngineBackend(engine, path.name)
    settings = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    ttft_of(backend, [{"role": "user", "content": "warm up"}], settings)  # first-call overheads out of turn 1
    drop_prefix_cache(engine)
    if args.overflow:
        overflow(args, engine, backend, settings, path)
        return

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
