"""Quantized MoE experts: `llm quantize` writes INT8/INT4 experts, the engine runs them, `llm estimate` sizes them.

References are independent of the quantized path: transformers running a float checkpoint in which every
quantized tensor was replaced by its dequantized value (int8.py / int4.py's closed-form dequantize), dense
experts_forward on dequantized stacked weights, and the bytes our engine allocates.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.quant.int4 import dequantize_int4, pack_int4, quantize_int4_rtn, unpack_int4
from llmcli.quant.int8 import dequantize_int8, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
BITS = {8: ["--bits", "8"], 4: ["--bits", "4", "--group-size", "32"]}


def _llm(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """(family, bits) -> (source dir, quantized dir, `llm quantize --json` summary), cached per module."""
    cache = {}

    def get(family: str, bits: int):
        if (family, bits) not in cache:
            src = tiny_model(family)
            out = tmp_path_factory.mktemp(f"q-{family}-{bits}") / "q"
            res = _llm("quantize", str(src), *BITS[bits], "-o", str(out), "--json")
            cache[family, bits] = (src, out, json.loads(res.stdout))
        return cache[family, bits]

    return get


def _tensors(directory) -> dict[str, torch.Tensor]:
    from llmcli.formats.safetensors import iter_safetensors

    return dict(iter_safetensors(directory))


def dequantized_checkpoint(qdir, dst):
    """A float checkpoint of qdir: `X.qweight` (+ scales, zeros) -> `X.weight`, other tensors as stored."""
    from safetensors.torch import save_file

    sd = _tensors(qdir)
    out = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            p = k.removesuffix(".qweight")
            out[f"{p}.weight"] = (
                dequantize_int8(v, sd[f"{p}.scales"])
                if v.dtype == torch.int8
                else dequantize_int4(unpack_int4(v), sd[f"{p}.scales"], sd[f"{p}.zeros"])
            )
        elif not k.endswith((".scales", ".zeros")):
            out[k] = v.float()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((qdir / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    return dst


def _logits(directory, ids: list[int]) -> torch.Tensor:
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model

    model, cfg = load_model(directory, "cpu", torch.float32)
    engine = LLMEngine(model, cfg, None, num_blocks=16)
    return engine.forward_logits([engine.add(ids)], all_positions=True)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each position's logits."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_writes_every_expert_and_keeps_routers(quantized, family, bits):
    from llmcli.engine.loader import load_model
    from llmcli.quant.experts import QuantExperts

    src, out, summary = quantized(family, bits)
    source = _tensors(src)
    stored = _tensors(out)
    experts = [k for k in source if ".experts." in k]
    assert experts and summary["bits"] == bits
    for k in experts:  # every per-expert projection quantized under its own name, shapes of int8.py / int4.py
        p = k.removesuffix(".weight")
        rows, cols = source[k].shape
        q = stored[f"{p}.qweight"]
        assert k not in stored and q.shape == (rows, cols if bits == 8 else cols // 2)
        assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert stored[f"{p}.scales"].shape[0] == rows and (bits == 8 or f"{p}.zeros" in stored)
    for k, v in source.items():  # routers and qwen2_moe's [1, H] shared_expert_gate stay 16-bit
        if k.endswith(("gate.weight", "shared_expert_gate.weight")):
            assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k].float(), v.bfloat16().float())
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(stored[k], v)  # fp32 kept: it reorders near-tied experts
    model, cfg = load_model(out)
    moe = [layer.mlp for i, layer in enumerate(model.model.layers) if cfg.is_moe_layer(i)]
    assert moe and all(isinstance(m.experts, QuantExperts) for m in moe)
    if bits == 4:  # groups by each projection's input: 32 divides the hidden size and the expert width
        assert moe[0].experts.gate_up_proj.group_size == 32 == moe[0].experts.down_proj.group_size


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_dequantized_checkpoint(quantized, tmp_path, monkeypatch, family, bits):
    """Our engine on the quantized dir vs transformers on the dequantized float checkpoint.

    Exact where the quantized modules dequantize and multiply in fp32 (forced for every row count here): only
    layout, loader and dispatch are under test. With the default CPU kernels (bf16 activations) every position
    is within bf16 error except where a rounding flips a near-tied router choice, so the median is checked."""
    import transformers

    from llmcli.quant import linear

    src, out, _ = quantized(family, bits)
    ref_dir = dequantized_checkpoint(out, tmp_path / "dq")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    kernels = _logits(out, ids)
    monkeypatch.setattr(linear, "DENSE_ROWS_CPU", 0)
    exact = _logits(out, ids)
    assert (exact - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert _rel(kernels, ref).median() < 0.02
    # and the quantized model is still the original model, loosely (tiny random models are fragile)
    original = _logits(src, ids)
    assert (exact - original).norm() / original.norm() < (0.1 if bits == 8 else 0.35)


def _random_experts(bits: int, e: int = 4, hidden: int = 64, inter: int = 32, seed: int = 0):
    """(QuantExperts filled with quantized random weights, dequantized gate_up [E, 2I, H], down [E, H, I])."""
    from llmcli.layers.activation import activation
    from llmcli.quant.experts import QuantExperts

    g = torch.Generator().manual_seed(seed)
    m = QuantExperts(e, hidden, inter, activation("silu"), bits, group_size=32)
    dense = []
    with torch.no_grad():
        for proj, (rows, cols) in ((m.gate_up_proj, (2 * inter, hidden)), (m.down_proj, (hidden, inter))):
            w = torch.randn(e, rows, cols, generator=g) * 0.1
            if bits == 8:
                q, s = quantize_int8(w)
                proj.qweight.copy_(q), proj.scales.copy_(s)
                dense.append(dequantize_int8(q, s))
            else:
                q, s, z = quantize_int4_rtn(w, 32)
                proj.qweight.copy_(pack_int4(q)), proj.scales.copy_(s), proj.zeros.copy_(z)
                dense.append(dequantize_int4(q, s, z))
    return m, dense[0], dense[1]


def _routing(tokens: int, e: int = 4, k: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, e, generator=g).topk(k, dim=-1).indices
    return ids, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 9, 300])  # 300 tokens: > 64 rows per expert, the dense fallback
def test_quant_experts_match_dense_experts(bits, tokens):
    """Same routing, same (dequantized) weights: QuantExperts == layers.moe.experts_forward."""
    from llmcli.layers.moe import experts_forward

    m, gate_up, down = _random_experts(bits)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(2))
    ids, w = _routing(tokens)
    with torch.no_grad():
        ref = experts_forward(x, ids, w, gate_up, down, m.act)
        got = m(x, ids, w)
    assert ref.abs().max() > 1e-2
    tol = 2e-6 if tokens == 300 else 2e-2  # fp32 dense fallback vs bf16-activation kernels
    torch.testing.assert_close(got, ref, atol=tol * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_reads_only_selected_quant_experts(bits):
    """A batch-1 step builds kernels for, and reads, only the experts the token picked: poisoning every other
    expert's scales with NaN changes nothing."""
    m, _, _ = _random_experts(bits, e=8)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    ids, w = _routing(1, e=8)
    others = torch.ones(8, dtype=torch.bool)
    others[ids.reshape(-1)] = False
    with torch.no_grad():
        before = m(x, ids, w)
        fresh, _, _ = _random_experts(bits, e=8)
        for proj in (fresh.gate_up_proj, fresh.down_proj):
            proj.scales[others] = float("nan")
        after = fresh(x, ids, w)
    assert torch.equal(before, after) and not after.isnan().any()
    built = [j for j in range(8) if fresh.gate_up_proj._experts[j] is not None]
    assert built == sorted(ids.reshape(-1).tolist())
    # the per-expert kernel objects are views of the stacked tensors, not copies of the plain layout
    j = built[0]
    assert fresh.down_proj.expert(j).qweight.data_ptr() == fresh.down_proj.qweight[j].data_ptr()


@pytest.mark.parametrize("args", [["--bits", "8"], ["--bits", "4", "--group-size", "32", "--method", "rtn"]])
def test_stacked_source_quantizes_like_per_expert(tiny_model, tmp_path, args):
    """A transformers v5 fused checkpoint (experts.gate_up_proj [E, 2I, H]) quantizes to stacked tensors that
    equal the per-expert checkpoint's quantized tensors stacked (rows quantize independently)."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    from llmcli.engine.loader import load_model

    src = tiny_model("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", fused / "config.json")
    _llm("quantize", str(fused), *args, "-o", str(tmp_path / "a"))
    _llm("quantize", str(src), *args, "-o", str(tmp_path / "b"))
    assert "model.layers.0.mlp.experts.gate_up_proj.qweight" in _tensors(tmp_path / "a")
    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_run_cli_on_quantized_moe_reports_expert_usage(tiny_model, tmp_path):
    import shutil

    from conftest import write_byte_tokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model("qwen2_moe"), d)
    write_byte_tokenizer(d)
    out = tmp_path / "int4"
    _llm("quantize", str(d), "--bits", "4", "--group-size", "32", "-o", str(out))
    res = _llm(
        "run", str(out), "hello world", "--raw", "--json", "-n", "5", "--ignore-eos", "-t", "0", "--device", "cpu"
    )
    j = json.loads(res.stdout.strip().splitlines()[-1])
    assert j["generated_tokens"] == 5
    usage = j["expert_usage"]
    assert sorted(usage) == ["0", "2"]  # layer 1 is in mlp_only_layers
    computed = j["prompt_tokens"] + j["generated_tokens"] - 1
    assert all(len(c) == 4 and sum(c) == computed * 2 for c in usage.values())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_weight_bytes_are_what_the_engine_allocates(quantized, family, bits):
    """`llm estimate QUANTIZED_DIR`: weight_bytes == bytes of every parameter our engine allocates loading the
    dir in bf16 == the safetensors tensors minus DeepSeek-V3's fp32 correction-bias buffers (not weights)."""
    from llmcli.engine.loader import load_model

    _, out, _ = quantized(family, bits)
    j = json.loads(_llm("estimate", str(out), "--json").stdout)
    assert j["dtype"] == ("int8" if bits == 8 else "int4")
    model, _ = load_model(out, "cpu", torch.bfloat16)
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors once
    assert j["weight_bytes"] == allocated
    stored = _tensors(out)
    buffers = sum(v.numel() * v.element_size() for k, v in stored.items() if k.endswith("e_score_correction_bias"))
    assert (family == "deepseek_v3") == (buffers > 0)
    assert j["weight_bytes"] == sum(v.numel() * v.element_size() for v in stored.values()) - buffers


def test_gptq_falls_back_for_experts_with_a_note(tiny_model, tmp_path):
    """GPTQ has Hessians for Linear inputs only: experts get the calibration-free method and the summary says so."""
    import shutil

    from conftest import write_byte_tokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model("qwen3_moe"), d)
    write_byte_tokenizer(d)
    cal = tmp_path / "cal.txt"
    cal.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = tmp_path / "g8"
    res = _llm(
        "quantize", str(d), "--bits", "8", "--method", "gptq", "--calibration", str(cal), "-o", str(out), "--json"
    )
    source, stored = _tensors(d), _tensors(out)
    experts = [k.removesuffix(".weight") for k in source if ".experts." in k]
    assert any(f"{len(experts)} expert tensors use rtn" in n for n in json.loads(res.stdout)["notes"])
    for p in experts:
        q, s = quantize_int8(source[f"{p}.weight"])
        assert torch.equal(stored[f"{p}.qweight"], q) and torch.equal(stored[f"{p}.scales"], s)


def test_odd_expert_width_stays_16bit_in_quantizer_and_estimate(tiny_model, tmp_path):
    """INT4 packs two input columns per byte: with an odd expert width the whole expert block stays 16-bit (the
    attention still packs), and `llm estimate` counts exactly that."""
    from llmcli.engine.loader import load_model
    from llmcli.layers.moe import Experts

    out = tmp_path / "q"
    _llm("quantize", str(tiny_model("qwen3_moe", moe_intermediate_size=33)), *BITS[4], "-o", str(out))
    model, _ = load_model(out, "cpu", torch.bfloat16)
    assert type(model.model.layers[0].mlp.experts) is Experts
    assert hasattr(model.model.layers[0].self_attn.qkv_proj, "qweight")
    j = json.loads(_llm("estimate", str(out), "--json").stdout)
    assert j["weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
