"""Quantizers against closed-form bounds, kernels against dense references, and quantized checkpoints run by
our engine against transformers running the same (dequantized) weights."""

from __future__ import annotations

import pytest
import torch

from llmcli.estimate import effective_group_size
from llmcli.quant.hqq import column_importance, quantize_int4_hqq, search_scale_zero, weighted_sq_error
from llmcli.quant.int4 import dequantize_int4, minmax_params, pack_int4, quantize_int4_rtn, unpack_int4
from llmcli.quant.int8 import dequantize_int8, quantize_int8
from llmcli.quant.linear import Int4Linear, Int8Linear


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(96, 80) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-6).all())


def test_int4_rtn_bound_packing_and_group_fallback():
    w = torch.randn(3, 40, 576) * 0.02  # a stack of experts: quantized as batched rows
    q, s, z = quantize_int4_rtn(w, 128)
    assert s.shape == (3, 40, 576 // 64)  # 576 is not a multiple of 128: largest power of two that divides
    assert int(q.max()) <= 15
    err = (dequantize_int4(q, s, z) - w).abs().reshape(3, 40, 9, 64)
    assert bool((err <= s.float().unsqueeze(-1) / 2 + 1e-5).all())
    packed = pack_int4(q)
    assert packed.shape == (3, 40, 288) and torch.equal(unpack_int4(packed), q)
    assert packed[0, 0, 0] == q[0, 0, 0] | (q[0, 0, 1] << 4)  # documented layout: even column in low nibble
    assert effective_group_size(1536, 128) == 128 and effective_group_size(576, 128) == 64
    assert effective_group_size(24, 32) == 24


def test_hqq_lowers_the_lp_error_of_rtn():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02  # heavy tails, like real weights

    def lp(qsz):
        return (dequantize_int4(*qsz) - w).abs().pow(0.7).mean()

    assert lp(quantize_int4_hqq(w, 64)) < lp(quantize_int4_rtn(w, 64))


def test_column_importance_is_the_inverse_column_mean_square():
    g = torch.Generator().manual_seed(0)
    col = torch.tensor([1.0, 2.0, 0.5, 4.0])
    w = torch.randn(2, 64, 4, generator=g).sign() * col  # |w| equals the column's factor in every row
    imp = column_importance(w)
    expected = (col.pow(-2) * col.pow(2).mean()).expand(2, 4)
    torch.testing.assert_close(imp, expected)


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_int4_scale_search_never_worse_than_minmax(kind):
    """Per group, the searched (fp16) grid's weighted squared error is at most the min/max grid's, under both
    uniform and column-importance weights; on average it is clearly lower."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g) * 0.02
    if kind == "outliers":  # a few large weights per row and one small-valued column, like real projections
        w += (torch.rand(64, 512, generator=g) < 0.01) * torch.randn(64, 512, generator=g) * 0.3
        w[:, 7] *= 0.05
    wg = w.reshape(64, 8, 64)
    for weight in (torch.ones(64), column_importance(w).reshape(8, 64)):
        s, z = search_scale_zero(wg, weight)
        assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())  # what is stored
        s0, z0 = minmax_params(wg)
        base = weighted_sq_error(wg, s0.half().float(), z0.half().float(), weight)
        err = weighted_sq_error(wg, s, z, weight)
        assert bool((err <= base).all())
        assert float(err.sum()) < 0.9 * float(base.sum())


def _load(mod, parts):
    with torch.no_grad():
        for k, v in parts.items():
            getattr(mod, k).copy_(v)
    return mod


@pytest.mark.parametrize("k", [64, 24])  # 24: the aten int8 kernel is wrong for K % 16 != 0 -> fallback path
def test_int8_linear_matches_dense(k):
    w = torch.randn(48, k) * 0.1
    q, s = quantize_int8(w)
    lin = _load(Int8Linear(k, 48, bias=True), {"qweight": q, "scales": s, "bias": torch.randn(48)})
    lin.finalize()
    assert lin._kernel["kernel"] == (k % 16 == 0)
    ref_w = dequantize_int8(q, s)
    for rows in (1, 3, 100):  # decode rows use the kernel, prefill rows a dense matmul
        x = torch.randn(rows, k)
        ref = x @ ref_w.T + lin.bias
        torch.testing.assert_close(lin(x), ref, atol=0.03 * float(ref.abs().max()), rtol=0)


def test_int8_linear_batched_rows_match_the_kernel_per_row(monkeypatch):
    """From INT8_GEMM_ROWS rows the int8 product runs as fp32 GEMMs over slices of the weight (a slice size that
    leaves a partial last slice): the kernel's rounding of x and the scales, so each row equals it decoded alone
    up to fp32 summation order, and the bf16-rounded product closed form."""
    from llmcli.quant import linear

    monkeypatch.setattr(linear, "INT8_SLICE_ROWS", 20)
    w = torch.randn(48, 64) * 0.1
    q, s = quantize_int8(w)
    lin = _load(Int8Linear(64, 48), {"qweight": q, "scales": s})
    lin.finalize()
    x = torch.randn(linear.INT8_GEMM_ROWS + 5, 64)
    y = lin(x)
    ref = x.bfloat16().float() @ (q.float() * s.bfloat16().float()[:, None]).T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(x.shape[0])])  # one row: aten._weight_int8pack_mm
    torch.testing.assert_close(y, alone, atol=0.01 * float(alone.abs().max()), rtol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_dense(group):
    w = torch.randn(96, 256) * 0.1
    q, s, z = quantize_int4_hqq(w, group)
    lin = _load(Int4Linear(256, 96, group), {"qweight": pack_int4(q), "scales": s, "zeros": z})
    lin.finalize()
    assert lin._kernel["packed"] is not None
    ref_w = dequantize_int4(q, s, z)
    for rows in (1, 5, 100):
        x = torch.randn(2, rows, 256)
        ref = x @ ref_w.T
        torch.testing.assert_close(lin(x), ref, atol=0.02 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("bits,method,group", [(8, "rtn", 128), (4, "rtn", 32), (4, "hqq", 128)])
def test_quantized_checkpoint_matches_transformers(tiny_model, tmp_path, bits, method, group):
    """Our engine on the quantized dir == transformers on the original with every quantized weight replaced
    by its dequantized value (so only the kernels and the loader are under test, not quantization error)."""
    import transformers
    from safetensors.torch import load_file

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantize_checkpoint

    src = tiny_model("llama")
    out = tmp_path / "q"
    summary = quantize_checkpoint(src, out, QuantSpec(bits, group, method))
    assert len(summary.layers) == 3 * 7  # q k v o gate up down per layer
    sd = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.embed_tokens") and k.endswith("qweight") for k in sd)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if f"{n}.qweight" in sd:
                if bits == 8:
                    w = sd[f"{n}.qweight"].float() * sd[f"{n}.scales"].float()[:, None]
                else:
                    w = dequantize_int4(unpack_int4(sd[f"{n}.qweight"]), sd[f"{n}.scales"], sd[f"{n}.zeros"])
                m.weight.copy_(w)
            elif f"{n}.weight" in sd and hasattr(m, "weight"):
                m.weight.copy_(sd[f"{n}.weight"].float())  # 16-bit copies of the rest
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    model, config = load_model(out, "cpu", torch.float32)
    engine = LLMEngine(model, config)
    seq = engine.add(ids[:4])
    first = engine.forward_logits([seq], all_positions=True)[0]  # few rows: the int kernels
    rest = engine.extend(seq, ids[4:])  # many rows: the dense path
    got = torch.cat([first, rest]).float()
    torch.testing.assert_close(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0)
    assert torch.equal(got.argmax(-1)[:4], expected.argmax(-1)[:4])


def test_nf4_checkpoint_loads_in_transformers_bitsandbytes(tiny_model, tmp_path):
    """The NF4 dir is a transformers bitsandbytes checkpoint: transformers loads Linear4bit modules from it and
    computes the same logits as the original model with our stored weights dequantized by bitsandbytes."""
    import transformers
    from safetensors.torch import load_file

    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantize_checkpoint
    from llmcli.quant.nf4 import dequantize_nf4_tensor

    src = tiny_model("llama")
    out = tmp_path / "nf4"
    quantize_checkpoint(src, out, QuantSpec(4, 64, "nf4"))
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if f"{n}.weight.absmax" in sd:
                parts = {k[len(n) + 1 :]: v for k, v in sd.items() if k.startswith(f"{n}.weight")}
                m.weight.copy_(dequantize_nf4_tensor(parts).reshape(m.weight.shape).float())
        ids = torch.tensor([[1, 5, 9, 33, 70, 100, 7, 200]])
        a, b = ref(ids).logits, loaded(ids).logits.float()
    torch.testing.assert_close(b, a, atol=0.03 * float(a.abs().max()), rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_beats_rtn_on_the_layer_output(bits):
    """GPTQ minimises ||X W^T - X Q^T||: with correlated inputs it must beat per-weight rounding."""
    from llmcli.quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated features
    w = torch.randn(64, 128, generator=g) * 0.05
    q, s, z = gptq_quantize(w, 2 * x.T @ x / x.shape[0], bits, 64)
    if bits == 8:
        deq, rq, rs = dequantize_int8(q, s), *quantize_int8(w)
        rtn = dequantize_int8(rq, rs)
    else:
        deq, rtn = dequantize_int4(q, s, z), dequantize_int4(*quantize_int4_rtn(w, 64))
    assert s.dtype == torch.float16 and (bits == 8 or int(q.max()) <= 15)
    err_gptq = (x @ (w - deq).T).pow(2).mean()
    err_rtn = (x @ (w - rtn).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_hqq_importance_of_qkv_is_the_input_norm_gain_squared(tiny_model, tmp_path, monkeypatch):
    """The checkpoint writer hands hqq the squared gain of the input RMSNorm for each q/k/v weight (read here
    straight from the source file) and no importance to o/gate/up/down (the data-free prior alone)."""
    from safetensors.torch import load_file

    import llmcli.quant.checkpoint as checkpoint
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantize_checkpoint

    src = tiny_model("llama")
    source = load_file(src / "model.safetensors")
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = checkpoint.quantize_int4_hqq

    def spy(w, group_size, *args, importance=None, **kw):
        seen.append((w.clone(), importance))
        return real(w, group_size, *args, importance=importance, **kw)

    monkeypatch.setattr(checkpoint, "quantize_int4_hqq", spy)  # the name the writer calls
    quantize_checkpoint(src, tmp_path / "q", QuantSpec(4, 32, "hqq"))
    checked = set()
    for w, importance in seen:
        name = next(n for n, t in source.items() if t.shape == w.shape and torch.equal(t.float(), w.float()))
        layer, leaf = name.split(".self_attn." if ".self_attn." in name else ".mlp.")
        norm = {
            "q_proj.weight": "input_layernorm",
            "k_proj.weight": "input_layernorm",
            "v_proj.weight": "input_layernorm",
        }.get(leaf)
        if norm is None:
            assert importance is None, name
        else:
            gain = source[f"{layer}.{norm}.weight"].float()
            assert not torch.allclose(gain, torch.ones_like(gain))  # the fixture perturbs norms: a real check
            torch.testing.assert_close(importance, gain.pow(2), rtol=0, atol=0)
        checked.add(leaf)
    assert checked == {f"{p}_proj.weight" for p in ("q", "k", "v", "o", "gate", "up", "down")}
