"""Where one batch-1 decode step of a kept-quantized GGUF goes, per kernel type, at each thread count (issue 18).

    python benchmarks/decode_profile.py [MODEL.gguf] [--threads 1 2] [--context 128] [--steps 10]

torch.profiler over --steps decode steps after a --context-token prefill; prints ms per step for the weight
kernels (int4 / int8 / fp16 head), attention (SDPA), the rest of aten's self time, and the step's wall time.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams
from llmcli.hub.resolve import resolve_model

KINDS = {
    "aten::_weight_int4pack_mm_for_cpu": "int4 mm",
    "aten::_weight_int8pack_mm": "int8 mm",
    "quantized::linear_dynamic": "fbgemm int8 dyn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "SDPA",
}


def profile_steps(engine: LLMEngine, context: int, steps: int) -> tuple[float, dict[str, float]]:
    seq = engine.add(list(range(100, 100 + context)), SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    try:
        engine.step([seq])
        engine.step([seq])  # lazy kernel packing happens before the measured steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step([seq])
            wall = (time.perf_counter() - t0) / steps
    finally:
        engine.release(seq)
    ms: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        kind = KINDS.get(ev.key)
        if kind is None and ev.key in ("aten::mm", "aten::addmm") and ev.self_cpu_time_total > 1000 * steps:
            kind = "dense mm (head)"
        ms[kind or "rest (aten self)"] += ev.self_cpu_time_total / 1000 / steps
    return wall * 1000, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="/root/.cache/llmcli/default/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    engine = LLMEngine.load(resolve_model(a.model), device="cpu", tokenizer=False, kv_cache_gib=0.05)
    for t in a.threads:
        torch.set_num_threads(t)
        wall, ms = profile_steps(engine, a.context, a.steps)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1]))
        print(f"threads {t} (torch {torch.get_num_threads()}): wall {wall:.2f} ms/step; {parts}")


if __name__ == "__main__":
    main()
