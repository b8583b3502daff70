"""GPTQ calibration: run the unquantized model on calibration text and collect each layer's input Hessian.

Forward hooks on every nn.Linear the spec quantizes accumulate X^T X of its inputs; all layers in one pass, i.e.
inputs come from the float model, not the partly quantized one. The Hessians feed llmcli.quant.gptq (through
llmcli.quant.checkpoint.quantize_checkpoint's `hessians`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcli.engine.llm_engine import LLMEngine
from llmcli.errors import UserError
from llmcli.quant import QuantSpec, quantizable_linears
from llmcli.tools.perplexity import encode_text


@torch.inference_mode()
def collect_hessians(
    src: Path, text: str, spec: QuantSpec, max_tokens: int = 2048, window: int = 512
) -> dict[str, torch.Tensor]:
    """Engine module name -> H = 2/n X^T X over the calibration tokens, for every Linear the spec quantizes."""
    ids = encode_text(src, text)[:max_tokens]
    if len(ids) < 16:  # before the weights load
        raise UserError("the calibration text is too short (fewer than 16 tokens)")
    # dequantize: a GGUF source keeps its linears quantized by default, and only nn.Linear gets hooks
    engine = LLMEngine.load(src, device="cpu", dtype=torch.float32, tokenizer=False, dequantize=True)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for name, m in quantizable_linears(engine.model, spec):
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        for s in range(0, len(ids), window):
            engine.forward_window(ids[s : s + window])
    finally:
        for h in hooks:
            h.remove()
    return {n: 2.0 * sums[n] / counts[n] for n in sums}
