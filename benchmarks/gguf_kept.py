"""A GGUF's Q4_0/Q4_1/Q8_0 weights kept quantized vs expanded (`--dequantize`): decode speed and weight bytes.

usage: python benchmarks/gguf_kept.py [MODEL.gguf] [--tokens 64] [--rounds 3] [--threads N]
Three engines over the same file (default: the built-in SmolLM2 Q4_1): every tensor expanded to fp32;
the linears kept quantized but the (Q8_0) embedding and tied head expanded; everything kept (the default
load). Batch 1, a 16-token random prompt, greedy; rounds alternate over the engines, the best is kept.
Also printed: how far the CPU int4 kernel's bf16 scale/offset table moves the (exact) kept 4-bit weights, and
how far Int4Linear's fp16 zero point (-m/d) would have moved them.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter/buffer (tied tensors once)."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


def expand_embedding(model: nn.Module) -> nn.Module:
    """Swap a kept int8 embedding (and its tied head) back for fp32 ones holding the same values."""
    emb = model.model.embed_tokens
    if hasattr(emb, "qweight"):
        dense = nn.Embedding(emb.num_embeddings, emb.embedding_dim, _weight=emb.dequantize(torch.float32))
        model.model.embed_tokens = dense
        head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
        head.weight = dense.weight
        model.lm_head = head
    return model


def int4_table_error(model: nn.Module) -> tuple[float, float]:
    """Relative (Frobenius) weight error over all Int4OffsetLinear modules: (bf16 kernel table, fp16 zero point)."""
    from llmcli.quant.int4 import unpack_int4
    from llmcli.quant.linear import Int4OffsetLinear

    err_table = err_zero = norm = 0.0
    for m in model.modules():
        if type(m) is not Int4OffsetLinear:
            continue
        w = m.dequantize()
        q = unpack_int4(m.qweight).float().view(m.out_features, -1, m.group_size)
        table = m._tinygemm_scales_zeros().float()  # [G, N, 2]: what the kernel multiplies by
        s, off = table[..., 0].t().unsqueeze(-1), table[..., 1].t().unsqueeze(-1)
        zero = (-m.offsets.float() / m.scales.float()).half().float().unsqueeze(-1)
        err_table += ((q - 8) * s + off).view_as(w).sub(w).pow(2).sum().item()
        err_zero += ((q - zero) * m.scales.float().unsqueeze(-1)).view_as(w).sub(w).pow(2).sum().item()
        norm += w.pow(2).sum().item()
    if not norm:  # nothing kept at 4 bits
        return 0.0, 0.0
    return (err_table / norm) ** 0.5, (err_zero / norm) ** 0.5


def main() -> None:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model
    from llmcli.hub.resolve import resolve_model
    from llmcli.tools.bench import bench_engine, random_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    variants = {
        "expanded fp32 (--dequantize)": load_model(path, dequantize=True),
        "linears kept, embedding fp32": (expand_embedding(load_model(path)[0]), None),
        "all kept (default)": load_model(path),
    }
    cfg = variants["all kept (default)"][1]
    engines = {k: LLMEngine(m, cfg, kv_cache_gib=0.25) for k, (m, _) in variants.items()}
    print(f"{path.name}, torch threads {torch.get_num_threads()}, batch 1, {a.tokens} tokens")
    best = dict.fromkeys(engines, float("inf"))
    for e in engines.values():
        bench_engine(e, random_prompts(cfg.vocab_size, 1, 16, 1), 8)  # warm-up: kernel packing, allocator
    for r in range(a.rounds):
        for k, e in engines.items():
            _, decode_s = bench_engine(e, random_prompts(cfg.vocab_size, 1, 16, 100 + r), a.tokens)
            best[k] = min(best[k], decode_s)
    for k, e in engines.items():
        print(f"{(a.tokens - 1) / best[k]:8.1f} tok/s  {weight_bytes(e.model) / 1e6:8.1f} MB weights  {k}")
    table, zero = int4_table_error(engines["all kept (default)"].model)
    print(
        f"kept 4-bit weights, relative error: bf16 kernel table {table:.2e}, "
        f"an fp16 zero point would add {zero:.2e}, the offsets themselves 0 (exact)"
    )


if __name__ == "__main__":
    main()
