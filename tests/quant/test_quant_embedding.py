"""--quantize-embeddings: the quantized token table (llmcli.quant.embedding) against its dequantized rows,
engine logits against transformers running the dequantized weights, and what a tied model stores on disk."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmcli.quant import QuantSpec
from llmcli.quant.checkpoint import quantize_checkpoint
from llmcli.quant.embedding import Int4Embedding, Int8Embedding
from llmcli.quant.hqq import quantize_int4_hqq
from llmcli.quant.int4 import dequantize_int4, pack_int4, unpack_int4
from llmcli.quant.int8 import dequantize_int8, quantize_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_lookup_equals_the_dequantized_rows(bits, dtype):
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the loader builds modules under the model's dtype
    try:
        emb = Int8Embedding(300, 96) if bits == 8 else Int4Embedding(300, 96, 32)
    finally:
        torch.set_default_dtype(prev)
    if bits == 8:
        q, s = quantize_int8(w)
        parts, table = {"qweight": q, "scales": s}, dequantize_int8(q, s, dtype)
    else:
        q, s, z = quantize_int4_hqq(w, 32)
        parts, table = {"qweight": pack_int4(q), "scales": s, "zeros": z}, dequantize_int4(q, s, z, dtype)
    with torch.no_grad():
        for k, v in parts.items():
            getattr(emb, k).copy_(v)
    ids = torch.tensor([[0, 299, 5, 5], [17, 0, 123, 42]])  # repeats and both ends of the table
    out = emb(ids)
    assert out.shape == (2, 4, 96) and out.dtype == dtype
    assert torch.equal(out, table[ids])
    assert torch.equal(emb.dequantize(dtype), table)


def _dequantized(sd: dict, prefix: str) -> torch.Tensor | None:
    if f"{prefix}.qweight" not in sd:
        return None
    q, s = sd[f"{prefix}.qweight"], sd[f"{prefix}.scales"]
    if f"{prefix}.zeros" in sd:
        return dequantize_int4(unpack_int4(q), s, sd[f"{prefix}.zeros"])
    return dequantize_int8(q, s)


@pytest.mark.parametrize("family,bits,method", [("qwen3", 8, "rtn"), ("qwen3", 4, "hqq"), ("llama", 4, "rtn")])
def test_engine_logits_match_float_model_of_the_dequantized_tensors(
    tiny_model, tmp_path, one_thread, family, bits, method
):
    """qwen3 tiny is tied (one table for lookup and head), llama untied (two tables). Reference: transformers
    on the source model with every stored quantized tensor replaced by its dequantized value."""
    import transformers

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model

    src = tiny_model(family, num_hidden_layers=2)
    out = tmp_path / "q"
    summary = quantize_checkpoint(src, out, QuantSpec(bits, 32, method, quantize_embeddings=True))
    sd = load_file(out / "model.safetensors")
    assert any(r.name == "model.embed_tokens" for r in summary.layers)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for n, m in ref.named_modules():
            w = _dequantized(sd, n)
            if w is not None:
                m.weight.copy_(w)
            elif f"{n}.weight" in sd and hasattr(m, "weight"):
                m.weight.copy_(sd[f"{n}.weight"].float())
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    model, config = load_model(out, "cpu", torch.float32)
    assert isinstance(model.model.embed_tokens, Int8Embedding if bits == 8 else Int4Embedding)
    if config.tie_word_embeddings:
        assert model.lm_head.qweight is model.model.embed_tokens.qweight
    engine = LLMEngine(model, config, num_blocks=8)
    short = engine.add(ids[:4])
    few = engine.forward_logits([short], all_positions=True)[0]  # 4 rows: the head's weight-only int kernel
    engine.release(short)
    many = engine.forward_logits([engine.add(ids)], all_positions=True)[0]  # 80 rows: dense on the dequantized
    scale = float(expected.abs().max())
    # the kernels run bf16 activations: close; the dense path is fp32 on the same values: near-exact
    torch.testing.assert_close(few.float(), expected[:4], atol=0.02 * scale, rtol=0)
    torch.testing.assert_close(many.float(), expected, atol=1e-4 * scale, rtol=0)


def _tensor_bytes(directory) -> dict[str, int]:
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = t.numel() * t.element_size()
    return out


def test_tied_model_stores_one_int8_table(tiny_model, tmp_path):
    """The tied table is stored once, as int8 values + one fp16 scale per row, in place of the bf16 table."""
    import json

    src = tiny_model("qwen3", num_hidden_layers=2)
    V, d = 256, 64
    plain = _tensor_bytes(quantize_checkpoint(src, tmp_path / "a", QuantSpec(8)).output)
    packed_dir = quantize_checkpoint(src, tmp_path / "b", QuantSpec(8, quantize_embeddings=True)).output
    packed = _tensor_bytes(packed_dir)
    assert plain["model.embed_tokens.weight"] == 2 * V * d and not any(k.startswith("lm_head") for k in plain)
    assert not any(k.startswith("lm_head") for k in packed) and "model.embed_tokens.weight" not in packed
    assert packed["model.embed_tokens.qweight"] == V * d and packed["model.embed_tokens.scales"] == 2 * V
    assert sum(plain.values()) - sum(packed.values()) == 2 * V * d - (V * d + 2 * V)
    assert json.loads((packed_dir / "config.json").read_text())["tie_word_embeddings"] is True
