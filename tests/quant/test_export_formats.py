"""Checkpoints other engines load: `--format compressed-tensors` against the compressed-tensors package and
transformers, `--format gptq` against an independent unpacking of the published GPTQ layout, and both loaded back
by our engine into its int4/int8 modules."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.errors import UserError
from llmcli.quant import QuantSpec
from llmcli.quant.compressed_tensors import pack_int32, unpack_int32

IDS = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def _ours(out) -> tuple[torch.nn.Module, torch.Tensor]:
    """(our model loaded from out, its logits on IDS: 4 rows through the int kernels, 36 more rows after)."""
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model

    model, config = load_model(out, "cpu", torch.float32)
    engine = LLMEngine(model, config)
    seq = engine.add(IDS[:4])
    first = engine.forward_logits([seq], all_positions=True)[0]
    return model, torch.cat([first, engine.extend(seq, IDS[4:])]).float()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    """Our int32 packing is the reference package's, along either dim (its codes are signed, ours offset)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (24, 40), generator=g, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    for dim in (0, 1):
        ours = pack_int32(codes, bits, dim=dim)
        assert torch.equal(ours, pack_to_int32(signed, bits, packed_dim=dim))
        assert torch.equal(unpack_int32(ours, bits, codes.shape[dim], dim=dim), codes)


@pytest.mark.parametrize(
    "family,bits,method",
    [("llama", 4, "rtn"), ("llama", 4, "hqq"), ("llama", 8, "rtn"), ("qwen2", 4, "rtn"), ("phi3", 4, "rtn")],
)
def test_compressed_tensors_loads_in_transformers_with_our_logits(
    tiny_model, tmp_path, one_thread, family, bits, method
):
    """transformers + compressed-tensors load the directory (the package's own decompression, config validated
    by its QuantizationConfig) and compute the logits our engine computes from its int4/int8 modules. qwen2: q/k/v
    biases kept 16-bit beside the packed weights; phi3: q/k/v and gate/up already fused in the checkpoint."""
    import transformers
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import CompressedTensorsConfig

    from llmcli.quant.checkpoint import quantize_checkpoint
    from llmcli.quant.linear import Int4Linear, Int8Linear

    out = tmp_path / "ct"
    summary = quantize_checkpoint(tiny_model(family), out, QuantSpec(bits, 128, method, format="compressed-tensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    sd = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert sd[f"{name}.weight_packed"].dtype == torch.int32 and sd[f"{name}.weight_shape"].tolist() == [64, 128]
    if bits == 4:  # one group size for the model: q/k/v/o/gate/up have 64 inputs, so down (128) uses 64 too
        assert summary.spec.group_size == 64 and sd[f"{name}.weight_scale"].shape == (64, 2)
        assert sd[f"{name}.weight_zero_point"].shape == (8, 2)  # packed along the output dim
    if family == "qwen2":
        assert sd["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    if family == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight_packed" in sd
    model, ours = _ours(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear if bits == 4 else Int8Linear)
    # INT4 asymmetric: the dequantize route (the package's decompress on our tensors). transformers' default route
    # rejects the packed zero point of the package's own output too (scripts/ct_transformers_routes.py)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if bits == 4 else {}
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours, expected, atol=0.02 * float(expected.abs().max()), rtol=0)
    assert torch.equal(ours.argmax(-1)[:4], expected.argmax(-1)[:4])


@pytest.mark.parametrize("bits", [4, 8])
def test_our_layout_is_the_reference_packages(tiny_model, tmp_path, one_thread, bits):
    """The same model quantized by the compressed-tensors package's own lifecycle (ModelCompressor): the same
    tensor names, shapes and dtypes, the same quantization_config; and the package's compress of our grid (our
    dequantized weights, scales and zero points) packs into exactly our tensors."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from ct_reference import write_reference_checkpoint
    from safetensors.torch import load_file

    from llmcli.quant.checkpoint import quantize_checkpoint

    src = tiny_model("llama")
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    quantize_checkpoint(src, ours, QuantSpec(bits, 64, "rtn", format="compressed-tensors"))
    write_reference_checkpoint(src, ref, bits, 64 if bits == 4 else None, symmetric=bits == 8)
    a, b = load_file(ours / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (ours, ref))
    assert ca["dtype"] == cb["dtype"] == "bfloat16"  # from an fp32 source: the dtype of the tensors written
    qa, qb = ca["quantization_config"], cb["quantization_config"]
    fields = QuantizationConfig.model_fields  # the reference adds bookkeeping: version, empty sparsity/transform
    assert QuantizationConfig.model_validate(qa) == QuantizationConfig.model_validate(
        {k: v for k, v in qb.items() if k in fields}
    )
    scheme = QuantizationConfig.model_validate(qa).config_groups["group_0"]
    p = "model.layers.1.mlp.down_proj"
    q = unpack_int32(a[f"{p}.weight_packed"], bits, 128).float() - 2 ** (bits - 1)
    parts = {"weight_scale": a[f"{p}.weight_scale"]}
    reps = 128 // parts["weight_scale"].shape[1]
    if bits == 4:
        zero = unpack_int32(a[f"{p}.weight_zero_point"], 4, 64, dim=0).to(torch.int8) - 8
        parts["weight_zero_point"] = zero
        q = q - zero.float().repeat_interleave(reps, -1)
    w = q * parts["weight_scale"].float().repeat_interleave(reps, -1)  # exact: small integers times bf16 scales
    packed = PackedQuantizationCompressor.compress({"weight": w, **parts}, scheme)
    assert packed.keys() == {k.rpartition(".")[2] for k in a if k.startswith(f"{p}.")}
    for k, t in packed.items():
        assert torch.equal(t, a[f"{p}.{k}"]), k


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_reference_checkpoints_load_in_our_engine_as_in_transformers(tiny_model, tmp_path, one_thread, bits, symmetric):
    """Checkpoints the compressed-tensors package wrote (its scales, its zero points, its symmetric INT4 that our
    writer does not produce) load into our int4/int8 modules with transformers' logits. transformers' default
    route (the model kept compressed, decompressed on the first forward) takes INT8 and symmetric INT4; asymmetric
    INT4 needs CompressedTensorsConfig(dequantize=True) even for the package's own output
    (scripts/ct_transformers_routes.py shows the error)."""
    import transformers
    from ct_reference import write_reference_checkpoint
    from transformers import CompressedTensorsConfig

    from llmcli.quant.linear import Int4Linear, Int8Linear

    out = write_reference_checkpoint(tiny_model("llama"), tmp_path / "ref", bits, 64 if bits == 4 else None, symmetric)
    model, ours = _ours(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear if bits == 4 else Int8Linear)
    kw = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours, expected, atol=0.02 * float(expected.abs().max()), rtol=0)
    assert torch.equal(ours.argmax(-1)[:4], expected.argmax(-1)[:4])


def _gptq_reference_weight(sd: dict, prefix: str) -> torch.Tensor:
    """The published GPTQ (v1) layout, decoded with plain shifts: qweight [K/8, N] holds input 8r+i of column n in
    bits 4i..4i+3 of row r; qzeros [G, N/8] likewise along the outputs, stored minus one."""
    qweight, qzeros = sd[f"{prefix}.qweight"].long() & 0xFFFFFFFF, sd[f"{prefix}.qzeros"].long() & 0xFFFFFFFF
    scales, g_idx = sd[f"{prefix}.scales"].double(), sd[f"{prefix}.g_idx"].long()
    k8, n = qweight.shape
    q = torch.zeros(k8 * 8, n, dtype=torch.float64)
    for i in range(8):
        q[i::8] = ((qweight >> (4 * i)) & 15).double()
    zeros = torch.zeros(qzeros.shape[0], n, dtype=torch.float64)
    for i in range(8):
        zeros[:, i::8] = ((qzeros >> (4 * i)) & 15).double() + 1
    return ((q - zeros[g_idx]) * scales[g_idx]).T  # [N, K]


def test_gptq_dequantizes_to_exactly_our_weights(tiny_model, tmp_path, one_thread):
    from safetensors.torch import load_file

    from llmcli.quant.checkpoint import quantize_checkpoint
    from llmcli.quant.linear import Int4Linear

    src = tiny_model("llama")
    out = tmp_path / "gptq"
    quantize_checkpoint(src, out, QuantSpec(4, 32, "rtn", format="gptq"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] and not qc["desc_act"] and qc["checkpoint_format"] == "gptq"
    sd = load_file(out / "model.safetensors")
    p = "model.layers.1.self_attn"
    assert sd[f"{p}.q_proj.qweight"].shape == (64 // 8, 64) and sd[f"{p}.q_proj.qzeros"].shape == (2, 64 // 8)
    assert bool((sd[f"{p}.q_proj.qzeros"] == 0x77777777).all())  # symmetric: zero 8 stored as 7
    assert torch.equal(sd[f"{p}.q_proj.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    model, _ = _ours(out)
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.group_size == 32 and bool((qkv.zeros == 8).all())
    reference = torch.cat([_gptq_reference_weight(sd, f"{p}.{x}_proj") for x in "qkv"])
    assert torch.equal(qkv.dequantize(torch.float64), reference)
    # the symmetric grid, scale 2 max|w| / 15 per group: every weight within half a step, plus what the bf16
    # rounding of the scale (relative 2**-8 at most) moves the largest code (7.5 steps) -- under 2**-5 of a step
    w = load_file(src / "model.safetensors")[f"{p}.q_proj.weight"].double()
    step = sd[f"{p}.q_proj.scales"].double().repeat_interleave(32, 0).T
    assert bool(((reference[:64] - w).abs() <= step * (0.5 + 2**-5)).all())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gptq_loads_in_transformers_with_our_logits(tiny_model, tmp_path, one_thread, family):
    """transformers' GPTQ route (optimum's GPTQQuantizer with gptqmodel's CPU kernel, which converts our v1 zeros
    to its v2 form itself) computes our engine's logits from our --format gptq directory. Needs gptqmodel and
    optimum, which `make install` adds with --no-deps (gptqmodel asks for a newer torch: see the Makefile)."""
    import transformers

    from llmcli.quant.checkpoint import quantize_checkpoint

    out = tmp_path / "gptq"
    quantize_checkpoint(tiny_model(family), out, QuantSpec(4, 32, "rtn", format="gptq"))
    _, ours = _ours(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(ref.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel.")
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours, expected, atol=0.02 * float(expected.abs().max()), rtol=0)
    assert torch.equal(ours.argmax(-1)[:4], expected.argmax(-1)[:4])


def test_gptq_act_order_checkpoint_loads_dequantized(tiny_model, tmp_path, one_thread):
    """A GPTQ checkpoint with desc_act (columns in a permuted group order) has no Int4Linear form: it loads into
    dense Linears holding the published dequantization of each weight."""
    from safetensors.torch import load_file, save_file

    from llmcli.engine.loader import load_model
    from llmcli.quant.checkpoint import quantize_checkpoint

    out = tmp_path / "gptq"
    quantize_checkpoint(tiny_model("llama"), out, QuantSpec(4, 32, "rtn", format="gptq"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(out / "model.safetensors")
    p = "model.layers.0.mlp.down_proj"
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    sd[f"{p}.g_idx"] = sd[f"{p}.g_idx"][perm].contiguous()  # act-order: input k belongs to group g_idx[k]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_model(out, "cpu", torch.float32)
    down = model.model.layers[0].mlp.down_proj
    assert type(down) is torch.nn.Linear
    assert torch.equal(down.weight.double(), _gptq_reference_weight(sd, p))


def test_gptq_calibrated_beats_rtn_in_the_gptq_layout(tiny_model, tmp_path, one_thread):
    """--method gptq fills the same symmetric grid with error feedback: lower layer-output error than rounding."""
    from llmcli.quant.compressed_tensors import grid_codes
    from llmcli.quant.gptq_format import symmetric_grid

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * 0.05
    s, z = symmetric_grid(w, 64, torch.bfloat16)
    errs = []
    for h in (None, 2 * x.T @ x / x.shape[0]):
        q = grid_codes(w, s, z, 64, h).float().reshape(64, 2, 64)
        deq = ((q - 8) * s.float().unsqueeze(-1)).reshape(64, 128)
        errs.append(float((x @ (w - deq).T).pow(2).mean()))
    assert errs[1] < 0.8 * errs[0]


def test_integer_zero_grids():
    """rtn: the min/max grid widened to hold 0, integer zeros; hqq: per group never a larger importance-weighted
    error than that grid (and smaller overall on heavy-tailed weights)."""
    from llmcli.quant.compressed_tensors import integer_zero_grid
    from llmcli.quant.hqq import column_importance, weighted_sq_error

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    w[:4] = w[:4].abs()  # rows of positive weights only: the grid must still hold 0
    wg = w.reshape(64, 4, 64)
    s0, z0 = integer_zero_grid(w, 64, "rtn", torch.bfloat16)
    assert s0.dtype == torch.bfloat16 and torch.equal(z0, z0.round()) and bool(((z0 >= 0) & (z0 <= 15)).all())
    assert bool((z0[:4] == 0).all())
    s1, z1 = integer_zero_grid(w, 64, "hqq", torch.bfloat16)
    assert torch.equal(z1, z1.round())
    weight = column_importance(w).reshape(4, 64)
    e0, e1 = (weighted_sq_error(wg, s.float(), z, weight) for s, z in ((s0, z0), (s1, z1)))
    assert bool((e1 <= e0).all()) and float(e1.sum()) < float(e0.sum())


@pytest.mark.parametrize(
    "spec,msg",
    [
        (QuantSpec(8, format="gptq"), "--bits 4"),
        (QuantSpec(4, 64, "hqq", format="gptq"), "--method rtn or gptq"),
        (QuantSpec(4, 64, "nf4", format="compressed-tensors"), "bitsandbytes"),
        (QuantSpec(8, quantize_embeddings=True, format="compressed-tensors"), "--quantize-embeddings"),
    ],
)
def test_combinations_the_formats_cannot_hold(spec, msg):
    with pytest.raises(UserError, match=msg):
        spec.validate()


def test_moe_is_refused_before_any_work(tiny_model, tmp_path):
    from llmcli.quant.checkpoint import quantize_checkpoint

    with pytest.raises(UserError, match="dense models only"):
        quantize_checkpoint(tiny_model("mixtral"), tmp_path / "x", QuantSpec(4, 64, "rtn", format="gptq"))
    assert not (tmp_path / "x").exists()
