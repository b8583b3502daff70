"""Decode speed by KV-cache format (--kv-dtype), side by side over one loaded model.

usage: python benchmarks/kv_dtype.py [MODEL] [--contexts 128,4000] [--tokens 32] [--rounds 3] [--kv auto,bf16,int8]
One engine per format shares the model's weights. For each context a random prompt of that many tokens is
prefilled once per engine; a round then decodes --tokens greedy tokens on every engine in turn and rolls the
sequence back to the prompt (engine.truncate), so each round measures decode at that context, alternating over the
formats (a shared machine's load hits them alike). The best round per format is printed, with the pool's bytes per
token (what `llm estimate --kv-dtype` reports).
"""

from __future__ import annotations

import argparse
import time

import torch


def decode_tok_s(engine, seq, prompt_len: int, tokens: int) -> float:
    """Greedy decode `tokens` tokens after the cached prompt, then roll back to it."""
    engine.step([seq])  # the prompt's last token (recomputed after a rollback): not timed
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        engine.step([seq])
    dt = time.perf_counter() - t0
    engine.truncate(seq, prompt_len)
    return (tokens - 1) / dt


def main() -> None:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.estimate import kv_bytes_per_token
    from llmcli.hub.resolve import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--contexts", default="128,4000")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv", default="auto,bf16,int8")
    a = ap.parse_args()
    path = resolve_model(a.model)
    model, cfg = load_model(path)
    kinds = a.kv.split(",")
    contexts = [int(c) for c in a.contexts.split(",")]
    budget = (max(contexts) + a.tokens + 64) * kv_bytes_per_token(cfg, 4) / 2**30  # fp32 bytes: fits every format
    engines = {k: LLMEngine(model, cfg, kv_cache_gib=budget, kv_dtype=k) for k in kinds}
    params = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    print(f"{path.name}, torch threads {torch.get_num_threads()}, batch 1, {a.tokens} tokens, best of {a.rounds}")
    for ctx in contexts:
        prompt = torch.randint(3, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        seqs = {}
        for k, e in engines.items():
            seqs[k] = e.add(prompt, params)
            e.forward_logits([seqs[k]])  # prefill, untimed
        best = dict.fromkeys(kinds, 0.0)
        for _ in range(a.rounds):
            for k, e in engines.items():
                best[k] = max(best[k], decode_tok_s(e, seqs[k], ctx, a.tokens))
        for k, e in engines.items():
            e.release(seqs[k])
        row = "  ".join(f"{k} {best[k]:.1f}" for k in kinds)
        print(f"context {ctx:>6,}: decode tok/s  {row}")
    per_token = {k: kv_bytes_per_token(cfg, e.kv_dtype or e.dtype.itemsize) for k, e in engines.items()}
    print("KV bytes per token: " + "  ".join(f"{k} {v:,}" for k, v in per_token.items()))


if __name__ == "__main__":
    main()
