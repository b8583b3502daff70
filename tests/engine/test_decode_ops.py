"""How many aten ops one batch-1 decode step of the real SmolLM2 Q4_1 (kept quantized) dispatches.

Per-op dispatch overhead, not the weight kernels, is what separates our CPU decode from llama.cpp's on a small
model (README "CPU decode"), so the count is held to a budget: a change that adds ops to every layer fails here
instead of showing up later as a slower benchmark. Counted with TorchDispatchMode, so it is deterministic.
"""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams

# Measured on the SmolLM2 Q4_1 (30 layers, torch 2.13): 1,450 ops per step = 48 per layer + 10 outside the layers
# (embedding, final norm, head, sampling); the budget leaves 6 ops of slack outside the layers, none inside.
OPS_PER_LAYER = 48
OPS_OUTSIDE_LAYERS = 16


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def kept_engine(smollm2_gguf):
    return LLMEngine.load(smollm2_gguf, device="cpu", tokenizer=False, kv_cache_gib=0.05)


def decode_step_ops(engine: LLMEngine) -> Counter[str]:
    seq = engine.add(list(range(100, 164)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    try:
        engine.step([seq])  # prefill
        engine.step([seq])  # first decode step: lazy kernel packing and table growth happen before counting
        with OpCounter() as counter:
            engine.step([seq])
    finally:
        engine.release(seq)
    return counter.ops


def test_decode_step_stays_within_op_budget(kept_engine):
    ops = decode_step_ops(kept_engine)
    layers = kept_engine.config.num_layers
    budget = OPS_PER_LAYER * layers + OPS_OUTSIDE_LAYERS
    total = sum(ops.values())
    assert total <= budget, f"{total} aten ops per decode step > budget {budget}: {ops.most_common(12)}"


def test_decode_step_runs_one_weight_kernel_per_projection(kept_engine):
    """Every kept projection (qkv, o, gate_up, down per layer) and the tied int8 head run their packed kernel once:
    no dequantize-then-matmul fallback and no second pass at batch-1 decode."""
    ops = decode_step_ops(kept_engine)
    layers = kept_engine.config.num_layers
    assert ops["aten._weight_int4pack_mm_for_cpu"] == 4 * layers
    assert ops["aten._weight_int8pack_mm"] == 1
    assert ops["aten.mm"] + ops["aten.addmm"] + ops["aten.linear"] == 0
