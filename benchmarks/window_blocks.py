"""KV blocks in use against tokens generated on a sliding-window model, per layer group.

usage: python benchmarks/window_blocks.py [MODEL] [--family gemma2] [--window 256] [--tokens 2048] [--every 256]
                                          [--kv-dtype auto] [--block-size 16] [--budget-gib G]
Without MODEL a small random-weight model of --family (gemma2: alternating sliding and full layers; mistral: every
layer slides; qwen2: use_sliding_window) is built with transformers and saved to a temporary directory. One greedy
generation of --tokens tokens runs from a 32-token prompt; every --every tokens the table shows the blocks each
layer group holds, the cache bytes they are (every layer, values and int8/fp8 scales), and llmcli.estimate.kv_bytes
at that context (the KV figure `llm estimate --context N --kv-dtype ...` reports) for the same --kv-dtype.
--budget-gib G then compares the longest context G GiB of KV holds with a pool per layer group against one pool.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

CONFIGS = {
    "gemma2": ("Gemma2Config", dict(head_dim=64, query_pre_attn_scalar=64)),
    "mistral": ("MistralConfig", dict(head_dim=64)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, max_window_layers=2)),
}


def build(family: str, window: int, directory: Path) -> Path:
    import transformers

    cls, extra = CONFIGS[family]
    config = getattr(transformers, cls)(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        sliding_window=window,
        **extra,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


def main() -> None:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.estimate import kv_bytes, kv_bytes_per_token

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--family", default="gemma2", choices=sorted(CONFIGS))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget-gib", type=float, default=None, help="also compare the context this budget holds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else build(args.family, args.window, Path(tmp))
        engine = LLMEngine.load(
            path, device="cpu", dtype="float32", tokenizer=False, block_size=args.block_size, kv_dtype=args.kv_dtype
        )
    kv = engine.kv_dtype or "fp32"
    groups = ["full" if w is None else f"window {w}" for w in engine.runner.windows]
    print(
        f"{path if args.model else args.family}  block_size {args.block_size}  kv {kv}  layer groups: "
        f"{', '.join(groups)}  (pools: {[len(p.blocks) for p in engine.block_manager.pools]} blocks)"
    )
    print(
        f"{'generated':>9} | {'context':>7} | "
        + " | ".join(f"{g:>12}" for g in groups)
        + " | engine KV bytes | estimate KV bytes"
    )
    seq = engine.add(list(range(3, 35)), SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
    for i in range(1, args.tokens + 1):
        engine.step([seq])
        if i % args.every == 0 or i == 1:
            n = seq.num_computed
            used = engine.block_manager.num_used
            got, want = engine.runner.kv_bytes_in_use(used), kv_bytes(engine.config, n, 1, kv)
            print(
                f"{i:>9} | {n:>7} | "
                + " | ".join(f"{u:>12}" for u in used)
                + f" | {got:>15,} | {want:>15,}"
                + ("" if got == want else "  DIFFERENT")
            )
    engine.release(seq)
    if args.budget_gib:  # the longest context a fixed --kv-cache-gib holds: a pool per group against one for all
        model, config = engine.model, engine.config
        split = LLMEngine(model, config, block_size=args.block_size, kv_cache_gib=args.budget_gib, kv_dtype=kv)
        per_block = kv_bytes_per_token(config, kv) * args.block_size
        one = LLMEngine(model, config, block_size=args.block_size, num_blocks=int(args.budget_gib * 2**30 // per_block))
        print(
            f"--kv-cache-gib {args.budget_gib}: context {split.context_len:,} tokens with a pool per layer group "
            f"({[len(p.blocks) for p in split.block_manager.pools]} blocks), {one.context_len:,} with one pool"
        )


if __name__ == "__main__":
    main()
