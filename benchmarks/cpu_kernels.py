"""Batch-1 (M = 1) weight-kernel comparison at SmolLM2-135M's projection shapes, at 1 and 2 threads (issue 18).

    python benchmarks/cpu_kernels.py [--threads 1 2] [--copies 30] [--min-run 0.3]

Prints microseconds per call (torch.utils.benchmark, median-of-blocked) for every CPU kernel torch offers that
could run a kept-quantized projection: the int4 tinygemm kernel, the int8 weight-only kernel, fbgemm's dynamic
int8 (activations quantized per call, u8 x s8 on AVX2), and dense fp32 / bf16 / fp16 matmuls. Timings on a
shared machine move; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch.utils import benchmark

# (name, N out, K in): fused qkv, o, fused gate_up, down, tied head
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("head", 49152, 576)]
GROUP = 32


def kernels(n: int, k: int, copies: int) -> dict[str, tuple[object, torch.Tensor]]:
    """name -> (callable of one activation, the activation it takes); each call uses the next of `copies`
    weight copies, so the working set is as large as the model's (decode streams every weight from DRAM)."""
    made = [one_copy(n, k) for _ in range(copies)]
    out = {}
    for name in made[0]:
        fns = itertools.cycle([m[name][0] for m in made])
        out[name] = ((lambda a, fns=fns: next(fns)(a)), made[0][name][1])
    return out


def one_copy(n: int, k: int) -> dict[str, tuple[object, torch.Tensor]]:
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, k)
    xb = x.bfloat16()
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.rand(k // GROUP, n, 2).bfloat16()
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n).bfloat16()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8).double()
    wq = torch.quantize_per_channel(w, scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    prepacked = torch.ops.quantized.linear_prepack(wq, None)
    prepacked_fp16 = torch.ops.quantized.linear_prepack_fp16(w, None)
    wb, wh = w.bfloat16(), w.half()
    return {
        "int4pack_mm_for_cpu (bf16 x)": (
            lambda a: torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed4, GROUP, sz),
            xb,
        ),
        "int8pack_mm (bf16 x)": (lambda a: torch.ops.aten._weight_int8pack_mm(a, q8, s8), xb),
        "fbgemm linear_dynamic int8 (fp32 x)": (lambda a: torch.ops.quantized.linear_dynamic(a, prepacked), x),
        "fbgemm linear_dynamic_fp16 (fp32 x)": (
            lambda a: torch.ops.quantized.linear_dynamic_fp16(a, prepacked_fp16),
            x,
        ),
        "dense fp32": (lambda a: F.linear(a, w), x),
        "dense bf16": (lambda a: F.linear(a, wb), xb),
        "dense fp16": (lambda a: F.linear(a, wh), x.half()),
    }


def time_us(fn, arg: torch.Tensor, threads: int, min_run: float) -> float:
    t = benchmark.Timer("fn(a)", globals={"fn": fn, "a": arg}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run).median * 1e6


def main() -> None:
    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--copies", type=int, default=30, help="weight copies cycled through (30 = SmolLM2's layers)")
    ap.add_argument("--min-run", type=float, default=0.3, help="seconds per measurement")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}; us per call, M = 1")
    for name, n, k in SHAPES:
        ks = kernels(n, k, 1 if name == "head" else args.copies)
        print(f"\n{name}: N={n} K={k}")
        for kname, (fn, a) in ks.items():
            cells = [f"{time_us(fn, a, t, args.min_run):8.1f}" for t in args.threads]
            print(f"  {kname:38s}" + "".join(f" {t}thr {c}" for t, c in zip(args.threads, cells)))


if __name__ == "__main__":
    main()
