"""NF4 (bitsandbytes layout): the writer's scale search and GPTQ placement against bitsandbytes' own
quantization, and the engine's NF4Linear against bitsandbytes' dequantization and transformers + bitsandbytes."""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from llmcli.quant.nf4 import NF4Linear, dequantize_nf4_tensor, quantize_nf4_tensor  # noqa: E402


def _bnb_plain(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own NF4 (absmax scale, nearest code, double quant), dequantized in fp32."""
    q, st = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    st.dtype = torch.float32
    return bnbf.dequantize_4bit(q, st)


def _parts_dequant(parts: dict) -> torch.Tensor:
    return dequantize_nf4_tensor(parts, dtype=torch.float32)


def test_nf4_scale_search_beats_bitsandbytes_absmax():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((96, 256)) * 0.02  # heavy tails, like real weights
    w = w.to(torch.bfloat16).float()  # bitsandbytes quantizes the bf16 weight; compare like with like
    plain = (_bnb_plain(w) - w).pow(2).mean()
    ours = (_parts_dequant(quantize_nf4_tensor(w, search=True)) - w).pow(2).mean()
    assert ours < 0.95 * plain
    # without the search it is bitsandbytes' quantizer up to code choice at the re-read scale (never worse)
    nosearch = (_parts_dequant(quantize_nf4_tensor(w, search=False)) - w).pow(2).mean()
    assert nosearch <= plain * 1.001


def test_nf4_gptq_beats_plain_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated features
    w = torch.randn(64, 128, generator=g) * 0.05
    h = 2 * x.T @ x / x.shape[0]
    err = {
        name: (x @ (w - _parts_dequant(p)).T).pow(2).mean()
        for name, p in (("plain", quantize_nf4_tensor(w)), ("gptq", quantize_nf4_tensor(w, h)))
    }
    assert err["gptq"] < 0.8 * err["plain"]


def test_nf4_linear_decodes_each_shards_nested_state():
    """Three shards with very different scales (so different nested offsets) fused into one NF4Linear
    dequantize exactly as bitsandbytes dequantizes each shard; decode rows agree through the kernel."""
    shards = [64, 32, 32]
    ws = [torch.randn(n, 128) * s for n, s in zip(shards, (0.02, 0.5, 0.003))]
    parts = [quantize_nf4_tensor(w) for w in ws]
    lin = NF4Linear(128, sum(shards), shards, bias=False)
    rows = 0
    with torch.no_grad():
        for i, p in enumerate(parts):
            n = p["weight"].shape[0]
            lin.weight[rows : rows + n].copy_(p["weight"])  # what the loader's fused row copy does
            rows += n
            for k, v in reversed(list(p.items())):  # any arrival order
                if k != "weight":
                    assert lin.load_hf_weight(k, v, shard=i)
    assert getattr(lin.absmax, "_llmcli_loaded", False)
    ref = torch.cat([_parts_dequant(p) for p in parts])
    assert torch.equal(lin.dequantize(), ref)
    lin.finalize()
    kernel = lin._kernel["bnb"]
    for n_rows in (1, 4, 40):
        x = torch.randn(n_rows, 128)
        expected = x @ ref.T
        if kernel is not None:  # bitsandbytes' CPU kernel: bf16 activations
            torch.testing.assert_close(lin(x), expected, atol=0.02 * float(expected.abs().max()), rtol=0)
        lin._kernel = {"bnb": None}  # the torch path: fp32 on the same values
        torch.testing.assert_close(lin(x), expected, atol=1e-5, rtol=1e-5)
        lin._kernel = {"bnb": kernel}


def test_nf4_checkpoint_runs_in_our_engine(tiny_model, tmp_path, one_thread):
    """Our engine on the NF4 dir == transformers running the original with every NF4 weight dequantized by
    bitsandbytes (tight on the fp32 torch path; bf16 tolerance on bitsandbytes' CPU kernel), and
    transformers + bitsandbytes loading the NF4 dir itself agrees too (bf16 kernels there)."""
    import transformers
    from safetensors.torch import load_file

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantize_checkpoint

    src = tiny_model("llama")
    out = tmp_path / "nf4"
    quantize_checkpoint(src, out, QuantSpec(4, 64, "nf4"))
    sd = load_file(out / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if f"{n}.weight.absmax" in sd:
                parts = {k[len(n) + 1 :]: v for k, v in sd.items() if k.startswith(f"{n}.weight")}
                m.weight.copy_(_parts_dequant(parts).reshape(m.weight.shape))
            elif f"{n}.weight" in sd and hasattr(m, "weight"):
                m.weight.copy_(sd[f"{n}.weight"].float())  # the 16-bit tensors as stored
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    model, config = load_model(out, "cpu", torch.float32)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "NF4Linear"
    scale = float(expected.abs().max())
    engine = LLMEngine(model, config)
    seq = engine.add(ids[:36])  # prefill, then 4 decode rows over the cache, through the default path
    got = torch.cat([engine.forward_logits([seq], all_positions=True)[0], engine.extend(seq, ids[36:])]).float()
    torch.testing.assert_close(got, expected, atol=0.03 * scale, rtol=0)
    for m in model.modules():  # the fp32 torch path must match to rounding
        if type(m).__name__ == "NF4Linear":
            m._kernel = {"bnb": None}
    engine = LLMEngine(model, config)  # a fresh cache (no prefix reuse from the first pass)
    seq = engine.add(ids[:36])
    got = torch.cat([engine.forward_logits([seq], all_positions=True)[0], engine.extend(seq, ids[36:])]).float()
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=0)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        theirs = bnb_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(theirs, expected, atol=0.03 * scale, rtol=0)


def test_nf4_checkpoint_with_hessians_places_codes_by_gptq(tiny_model, tmp_path, one_thread):
    """With Hessians (what `--method nf4 --calibration FILE` collects) the writer places codes by GPTQ: other
    codes than the calibration-free ones, a lower layer-output error on those inputs, same layout, loadable."""
    from safetensors.torch import load_file

    from llmcli.config import load_config
    from llmcli.engine.loader import load_model
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantize_checkpoint
    from llmcli.quant.nf4 import nf4_targets

    src = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    xs, hessians = {}, {}
    for name, m in nf4_targets(load_config(src)).items():
        x = torch.randn(256, m.in_features, generator=g) @ torch.randn(m.in_features, m.in_features, generator=g)
        xs[name], hessians[name] = x, 2 * x.T @ x / x.shape[0]
    plain, gptq = tmp_path / "plain", tmp_path / "gptq"
    quantize_checkpoint(src, plain, QuantSpec(4, 64, "nf4"))
    quantize_checkpoint(src, gptq, QuantSpec(4, 64, "nf4"), hessians=hessians)
    a, b = load_file(plain / "model.safetensors"), load_file(gptq / "model.safetensors")
    orig = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"
    assert a.keys() == b.keys() and not torch.equal(a[f"{key}.weight"], b[f"{key}.weight"])
    x, w = xs[key], orig[f"{key}.weight"]
    err = {
        n: (
            x
            @ (
                w
                - _parts_dequant(
                    {k[len(key) + 1 :]: v for k, v in sd.items() if k.startswith(f"{key}.weight")}
                ).reshape(w.shape)
            ).T
        )
        .pow(2)
        .mean()
        for n, sd in (("plain", a), ("gptq", b))
    }
    assert err["gptq"] < err["plain"]
    load_model(gptq)
