"""The real SmolLM2-135M quantized by `llm quantize` still answers a factual question (issue: "each quantized
model still answers 'What is the capital of France?' with Paris")."""

from __future__ import annotations

import pytest

from llmcli.quant import QuantSpec

QUESTION = "What is the capital of France?"


@pytest.mark.parametrize("spec", [QuantSpec(8, method="rtn"), QuantSpec(4, 64, "hqq")], ids=["int8", "int4-g64-hqq"])
def test_quantized_smollm2_answers_paris(smollm2_gguf, tmp_path, spec):
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.quant.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(smollm2_gguf, tmp_path / "q", spec).output
    engine = LLMEngine.load(out, device="cpu", kv_cache_gib=0.05)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    (reply,) = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=24))
    text = engine.tokenizer.decode(reply, skip_special_tokens=True)
    assert "Paris" in text, text
