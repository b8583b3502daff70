"""Which NF4 compute path is fastest on this CPU, per SmolLM2 layer shape and row count.

  .venv/bin/python benchmarks/nf4_linear.py
Paths: bitsandbytes' AVX512-BF16 kernel on its repacked layout (what NF4Linear uses for decode), bitsandbytes'
generic matmul_4bit on the checkpoint layout, torch table dequantization + fp32 matmul (NF4Linear's prefill
path), and a dense fp32 matmul on the already-dequantized weight (the unquantized baseline).
Timings interleave the paths round by round and report medians, so a busy machine skews them alike.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from llmcli.quant.nf4 import NF4Linear, quantize_nf4_tensor

    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}  avx512bf16 {bnbf.has_avx512bf16()}")
    for out_f, in_f in ((960, 576), (3072, 576), (576, 1536)):  # qkv, gate_up, down of SmolLM2-135M
        parts = quantize_nf4_tensor(torch.randn(out_f, in_f) * 0.02, search=False)
        lin = NF4Linear(in_f, out_f, [out_f])
        with torch.no_grad():
            lin.weight.copy_(parts["weight"])
            for k, v in parts.items():
                if k != "weight":
                    lin.load_hf_weight(k, v)
        lin.finalize()
        w = lin.dequantize()
        state = bnbf.QuantState(
            absmax=lin.absmax.detach(),
            shape=torch.Size((out_f, in_f)),
            code=lin.code.detach(),
            blocksize=64,
            quant_type="nf4",
            dtype=torch.float32,
        )
        for rows in (1, 4, 64, 256):
            x = torch.randn(rows, in_f)
            xb = x.bfloat16()
            # default arguments bind this iteration's tensors (the lambdas run before the next one)
            paths = {
                "bnb avx512 kernel": lambda xb=xb, lin=lin: (
                    bnb.matmul_4bit(xb, *lin._kernel["bnb"]) if lin._kernel["bnb"] else None
                ),
                "bnb generic": lambda x=x, state=state, lin=lin: bnb.matmul_4bit(x, lin.weight, state),
                "torch dequant+fp32": lambda x=x, lin=lin: F.linear(x, lin.dequantize()),
                "dense fp32 (no quant)": lambda x=x, w=w: F.linear(x, w),
            }
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(15):
                for k, f in paths.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            cols = "  ".join(f"{k} {statistics.median(v) * 1e3:7.3f} ms" for k, v in times.items())
            print(f"[{out_f}x{in_f}] rows {rows:3d}: {cols}")


if __name__ == "__main__":
    main()
