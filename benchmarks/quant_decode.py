"""Decode tok/s of a model and its quantized versions side by side (CPU by default).

usage: python benchmarks/quant_decode.py [MODEL ...] [--tokens 64] [--dtype float32] [--rounds 2]
Each MODEL is anything `llm` resolves (a dir from `llm quantize`, a .gguf). Batch 1, a 16-token random
prompt, greedy with ignore_eos; the first token (prefill) is excluded from the rate. Rounds alternate over
the models and the best is kept (llmcli.tools.bench's method). To quantize on the fly instead of passing
directories: `llm bench MODEL --compare int8,int4`.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.hub.resolve import resolve_model
    from llmcli.tools.bench import bench_engine, random_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, dtype {a.dtype}, device {a.device}")
    engines = [
        LLMEngine.load(resolve_model(m), device=a.device, dtype=a.dtype, tokenizer=False, kv_cache_gib=0.25)
        for m in a.models
    ]
    best = [float("inf")] * len(engines)
    for e in engines:
        bench_engine(e, random_prompts(e.config.vocab_size, 1, 16, 1), 8)  # warm-up: kernel packing, allocator
    for r in range(a.rounds):
        for i, e in enumerate(engines):
            _, decode_s = bench_engine(e, random_prompts(e.config.vocab_size, 1, 16, 100 + r), a.tokens)
            best[i] = min(best[i], decode_s)
    for m, s in zip(a.models, best):
        print(f"{(a.tokens - 1) / s:8.1f} tok/s  {m}", flush=True)


if __name__ == "__main__":
    main()
