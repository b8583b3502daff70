"""Batch-1 decode, eager vs the compiled step (`--compile on`), side by side in one process.

usage: python benchmarks/compiled_decode.py [MODEL.gguf] [--threads 1] [--contexts 128,2000] [--tokens 32]
                                            [--rounds 2]
Two LLMEngines share one loaded model: one decodes eagerly, the other through llmcli.engine.compiled_step (compiled
before the rounds, or loaded from the llmcli home when an earlier run compiled it: the compile's seconds are
printed). Per context both get the same random prompt, one prefill and one untimed decode step, then --tokens timed
greedy steps; rounds alternate between the engines and the best of each is kept. Printed: ms per token of each,
the speed-up, and whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import os
import time


def timed_decode(engine, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Seconds per decode step over `tokens` steps after the prefill and one untimed step, and the tokens."""
    from llmcli.engine.sampling_params import SamplingParams

    seq = engine.add(ids, SamplingParams(temperature=0.0, max_tokens=tokens + 2, ignore_eos=True))
    try:
        engine.step([seq])
        engine.step([seq])
        t0 = time.perf_counter()
        for _ in range(tokens):
            engine.step([seq])
        return (time.perf_counter() - t0) / tokens, seq.token_ids[len(ids) :]
    finally:
        engine.release(seq)


def report_compile(event) -> None:
    if event.kind == "done":
        where = "loaded from the llmcli home" if event.cached else "compiled"
        print(f"decode step {where} in {event.seconds:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="Batch-1 decode: eager vs the compiled step, side by side.")
    ap.add_argument("model", nargs="?", help="a .gguf or model directory (default: the built-in SmolLM2 Q4_1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="128,2000", help="comma-separated prompt lengths (default 128,2000)")
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per round (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds, the best kept (default 2)")
    a = ap.parse_args()

    import torch

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.hub.resolve import resolve_model

    torch.set_num_threads(a.threads)
    eager = LLMEngine.load(resolve_model(a.model), device="cpu", tokenizer=False, kv_cache_gib=0.3)
    compiled = LLMEngine(eager.model, eager.config, num_blocks=eager.runner.num_blocks)
    compiled.source = eager.source
    compiled.set_compile("on", on_event=report_compile)
    timed_decode(compiled, [1, 2, 3], 1)  # compiles (or loads) before any round
    print(f"threads {a.threads}, {a.tokens} timed steps, best of {a.rounds} alternating rounds, ms per token")
    for ctx in (int(c) for c in a.contexts.split(",")):
        ids = torch.randint(3, eager.config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        runs = {"eager": [], "compiled": []}
        out = {}
        for _ in range(a.rounds):
            for name, engine in (("eager", eager), ("compiled", compiled)):
                s, out[name] = timed_decode(engine, ids, a.tokens)
                runs[name].append(s)
        e, c = min(runs["eager"]), min(runs["compiled"])
        same = out["eager"] == out["compiled"]
        print(
            f"ctx {ctx:>5}: eager {e * 1e3:6.1f}  compiled {c * 1e3:6.1f}  speed-up {e / c:4.2f}x  "
            f"same tokens {same}  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
