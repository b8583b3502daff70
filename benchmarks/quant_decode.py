"""Decode tok/s of a model and its quantized versions side by side (CPU by default).

usage: python benchmarks/quant_decode.py [MODEL ...] [--tokens 64] [--dtype bfloat16]
Each MODEL is anything `llm` resolves (a dir from `llm quantize`, a .gguf). Greedy decoding with
ignore_eos from a short prompt; the first token (prefill) is excluded from the rate.
"""

from __future__ import annotations

import argparse
import time

import torch


def decode_rate(model: str, tokens: int, dtype: str, device: str) -> float:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sequence import SamplingParams

    engine = LLMEngine.load(model, device=device, dtype=dtype, tokenizer=False)
    prompt = list(range(100, 116))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up: kernel packing, allocator
    seq = engine.add(prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    engine.step([seq])
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        engine.step([seq])
    dt = time.perf_counter() - t0
    engine.release(seq)
    return (tokens - 1) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, dtype {a.dtype}, device {a.device}")
    for m in a.models:
        print(f"{decode_rate(m, a.tokens, a.dtype, a.device):8.1f} tok/s  {m}", flush=True)


if __name__ == "__main__":
    main()
