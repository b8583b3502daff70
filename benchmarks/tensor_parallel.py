"""Decode tok/s at --tensor-parallel 1 and N on this machine (CPU by default).

usage: python benchmarks/tensor_parallel.py [MODEL] [--tp 1,2] [--tokens 64] [--rounds 3] [--dtype float32]
MODEL is anything `llm` resolves (default: the built-in SmolLM2-135M Q4_1 GGUF, kept quantized). Batch 1, a
16-token random prompt, greedy with ignore_eos; the first token (prefill) is excluded from the rate. Each
configuration runs in its own process (N ranks divide the machine's torch threads between them, which would leak
into the next run in one process); rounds alternate over the configurations and the best is kept. "tp 1 @ k
threads" is also run with the thread count one rank gets, to separate what splitting the work gains from what
the per-layer all-reduces and the per-step broadcast cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def child(model: str | None, world: int, tokens: int, dtype: str, device: str) -> None:
    from llmcli.engine.tp import load_engine, shutdown
    from llmcli.hub.resolve import resolve_model
    from llmcli.tools.bench import bench_engine, random_prompts

    path = resolve_model(model)
    engine = load_engine(path, world, device, dtype, tokenizer=False, kv_cache_gib=0.25)
    bench_engine(engine, random_prompts(engine.config.vocab_size, 1, 16, 1), 8)  # warm-up: kernel packing
    _, decode_s = bench_engine(engine, random_prompts(engine.config.vocab_size, 1, 16, 100), tokens)
    print(json.dumps({"decode_tok_s": (tokens - 1) / decode_s, "threads": torch.get_num_threads()}))
    shutdown()


def run(args: argparse.Namespace, world: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, *([args.model] if args.model else []), "--child", str(world)]
    cmd += ["--tokens", str(args.tokens), "--dtype", args.dtype, "--device", args.device]
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.model, a.child, a.tokens, a.dtype, a.device)
        return
    worlds = [int(w) for w in a.tp.split(",")]
    total = torch.get_num_threads()
    configs = [(w, None, f"tp {w}") for w in worlds]
    for w in worlds:
        if w > 1 and total // w != total:
            configs.append((1, max(1, total // w), f"tp 1 @ {max(1, total // w)} threads"))
    best: dict[str, dict] = {}
    for _ in range(a.rounds):
        for world, threads, label in configs:
            r = run(a, world, threads)
            if label not in best or r["decode_tok_s"] > best[label]["decode_tok_s"]:
                best[label] = r
    print(f"torch threads on this machine: {total}; dtype {a.dtype}; best of {a.rounds} rounds")
    for label, r in best.items():
        print(f"{label:>22}: {r['decode_tok_s']:7.1f} tok/s decode  ({r['threads']} threads per rank)")


if __name__ == "__main__":
    main()
