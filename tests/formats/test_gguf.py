"""llmcli.formats' GGUF reading against independent references.

* The real SmolLM2 GGUF: config and every tensor must equal what transformers' own GGUF loader produces.
* Synthetic GGUFs written here from tiny transformers models, the way llama.cpp's converter writes them
  (names from gguf-py's own tensor map, llama's Q/K row permutation, gemma's 1 + w norms, stacked experts):
  reading them back must give the original safetensors weights and the same normalized config.
* llama3 rope scaling recovered from the stored per-frequency factors must reproduce transformers' inv_freq.
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmcli.config import load_config
from llmcli.errors import UserError
from llmcli.formats.gguf_config import llama3_scaling_from_factors, load_gguf_config
from llmcli.formats.gguf_reader import open_gguf
from llmcli.formats.gguf_tensors import dequantize_torch, gguf_raw_tensor, iter_gguf_raw, iter_gguf_tensors

Q = gguf.GGMLQuantizationType


# ---- the real file vs transformers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_config_matches_transformers(smollm2_gguf, hf_smollm2):
    cfg = load_gguf_config(smollm2_gguf)
    ref = hf_smollm2.config
    assert cfg.family == ref.model_type == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
    )
    assert cfg.intermediate_size == ref.intermediate_size
    assert cfg.max_position_embeddings == ref.max_position_embeddings
    assert cfg.norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.rope_scaling is None
    assert cfg.tie_word_embeddings is ref.tie_word_embeddings is True
    assert cfg.bos_token_id == ref.bos_token_id
    assert cfg.eos_token_ids == (ref.eos_token_id,)


def test_smollm2_tensors_equal_transformers(smollm2_gguf, hf_smollm2):
    ref = hf_smollm2.state_dict()
    ours = {}
    for name, t in iter_gguf_tensors(smollm2_gguf, torch.float32):
        assert name not in ours
        ours[name] = t
    # Tied embeddings: transformers lists lm_head.weight as an alias of the embedding; the file has none.
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.shape == ref[name].shape, name
        assert torch.equal(t, ref[name]), name


def test_smollm2_raw_blocks_are_quantized_and_unpermuted(smollm2_gguf, hf_smollm2):
    raw = gguf_raw_tensor(smollm2_gguf, "model.layers.3.self_attn.k_proj.weight")
    assert raw.ggml_type == Q.Q4_1 and raw.shape == (192, 576)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_1]
    assert (raw.block_size, raw.type_size) == (block, size) == (32, 20)
    assert raw.data.dtype == np.uint8 and raw.data.shape == (192, 576 // block * size)
    ref = hf_smollm2.state_dict()["model.layers.3.self_attn.k_proj.weight"]
    assert torch.equal(torch.from_numpy(raw.dequantize()), ref)
    emb = gguf_raw_tensor(smollm2_gguf, "model.embed_tokens.weight")
    assert emb.ggml_type == Q.Q8_0 and emb.shape == (49152, 576)


def test_half_precision_output(smollm2_gguf, hf_smollm2):
    name, t = next(iter_gguf_tensors(smollm2_gguf, torch.bfloat16))
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, hf_smollm2.state_dict()[name].to(torch.bfloat16))


# ---- synthetic GGUFs written the way llama.cpp's converter does --------------------------------------

ARCH = {
    "llama": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf: HF rotates halves, GGML rotates adjacent pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, path, family: str, qtype=Q.F32, split_max_tensors: int = 0) -> dict[str, np.ndarray]:
    """Convert a tiny HF checkpoint to GGUF; returns the expected HF tensors (dequantized if qtype is lossy)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    arch = ARCH[family]
    n = cfg["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:  # gemma3: one rope per layer type
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        rope = rope["full_attention"]
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_bos_token_id(cfg.get("bos_token_id") or 1)
    w.add_eos_token_id(cfg.get("eos_token_id") or 2)
    if cfg.get("sliding_window") and family in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if family == "gemma3":
        w.add_sliding_window_pattern([bool((i + 1) % cfg["sliding_window_pattern"]) for i in range(n)])
    if family in ("mixtral", "qwen2_moe"):
        w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if family == "qwen2_moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if rope.get("rope_type") == "llama3":
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        c = LlamaConfig(
            **{k: v for k, v in cfg.items() if k in ("hidden_size", "num_attention_heads", "head_dim")},
            rope_parameters=rope,
        )
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
        base = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, t: np.ndarray, hf_names_and_rows: list[tuple[str, np.ndarray]]) -> None:
        # Quantize 2-D weights whose rows are whole blocks; 1-D tensors stay F32 (as llama.cpp does).
        q = qtype if t.ndim >= 2 and t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F32
        data = gguf.quants.quantize(t.astype(np.float32), q)
        w.add_tensor(gguf_name, data, raw_dtype=q)
        for hf_name, value in hf_names_and_rows:
            rt = gguf.quants.quantize(value.astype(np.float32), q) if q != Q.F32 else value
            expected[hf_name] = gguf.quants.dequantize(rt, q).reshape(value.shape) if q != Q.F32 else value

    experts: dict[tuple[int, str], list] = {}
    for name, t in sd.items():
        base, _, suffix = name.rpartition(".")
        if ".experts." in name:  # model.layers.L.(mlp|block_sparse_moe).experts.E.PROJ.weight
            parts = name.split(".")
            experts.setdefault((int(parts[2]), parts[-2]), []).append((int(parts[5]), name, t))
            continue
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        gname = name_map.get_name(base)
        assert gname is not None, name
        stored = t
        if family in ("llama", "mixtral") and base.endswith(("q_proj", "k_proj")):
            stored = _permute(t, heads if "q_proj" in base else kv)
        if family in ("gemma2", "gemma3") and base.endswith("norm"):
            stored = t + 1.0
        if base.endswith("shared_expert_gate"):
            stored = t.reshape(-1)
        add(f"{gname}.{suffix}", stored, [(name, t)])
    for (layer, proj), items in experts.items():
        items.sort()
        stacked = np.stack([t for _, _, t in items])
        gname = {
            "w1": "ffn_gate_exps",
            "w3": "ffn_up_exps",
            "w2": "ffn_down_exps",
            "gate_proj": "ffn_gate_exps",
            "up_proj": "ffn_up_exps",
            "down_proj": "ffn_down_exps",
        }[proj]
        add(f"blk.{layer}.{gname}.weight", stacked, [(n_, t) for _, n_, t in items])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2_moe", "mixtral"])
def test_synthetic_roundtrip(family, tiny_model, tmp_path):
    # llama.cpp's qwen2 has no sliding-window metadata, so a GGUF can only describe a full-attention qwen2;
    # llama.cpp hard-codes gemma's query scale as head_dim (all but the 27B models) and has no dense layers
    # in qwen2moe: build the tiny models so.
    overrides = {
        "qwen2": dict(use_sliding_window=False),
        "gemma2": dict(query_pre_attn_scalar=32),
        "gemma3": dict(query_pre_attn_scalar=32),
        "qwen2_moe": dict(mlp_only_layers=[]),
    }.get(family, {})
    src = tiny_model(family, **overrides)
    path = tmp_path / f"{family}.gguf"
    expected = write_gguf(src, path, family)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(expected)
    for name, t in got.items():
        if family.startswith("gemma") and name.endswith("norm.weight"):  # (1 + w) - 1 rounds at float32's eps(1)
            np.testing.assert_allclose(t.numpy(), expected[name], rtol=0, atol=1.2e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(t.numpy(), expected[name], err_msg=name)

    ours, ref = load_gguf_config(path).to_dict(), load_config(src).to_dict()
    floats = (
        "norm_eps",
        "rope_theta",
        "attn_scale",
        "attn_logit_softcap",
        "final_logit_softcap",
        "rope_local_theta",
        "embedding_scale",
    )
    # Not in GGUF metadata, or (llama3) stored only as equivalent factors: checked elsewhere.
    skip = {"rope_scaling", "original_max_position_embeddings", "torch_dtype", "eos_token_ids", "bos_token_id"}
    for key in ref:
        if key in skip:
            continue
        if key in floats:
            assert _close(ours[key], ref[key]), (key, ours[key], ref[key])
        else:
            assert ours[key] == ref[key], (key, ours[key], ref[key])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16])
def test_quantized_llama_rows_unpermuted(qtype, tiny_model, tmp_path):
    # Quantizing is row-wise, so dequant(quant(permute(w))) unpermuted must equal dequant(quant(w)).
    path = tmp_path / "q.gguf"
    expected = write_gguf(tiny_model("llama"), path, "llama", qtype)
    got = dict(iter_gguf_tensors(path))
    for name, t in got.items():
        np.testing.assert_array_equal(t.numpy(), expected[name], err_msg=name)
    raw = {r.name: r for r in iter_gguf_raw(path)}
    q = raw["model.layers.1.self_attn.q_proj.weight"]
    assert q.ggml_type == qtype and q.shape == (64, 64)
    np.testing.assert_array_equal(q.dequantize(), expected[q.name])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.BF16])
def test_k_quant_blocks_dequantize(qtype, tmp_path):
    # gguf-py cannot quantize K-quants; random blocks (finite f16 scales) are valid data for the reader.
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 8, 2 * block
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d and dmin are the first two f16s
        blocks[..., :4] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:  # d is the last f16
        blocks[..., -2:] = np.frombuffer(np.float16([0.01]).tobytes(), np.uint8)
    else:
        blocks = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16)
    data = blocks.reshape(rows, -1)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "qwen2")
    for k, v in dict(block_count=1, embedding_length=cols, head_count=1).items():
        getattr(w, f"add_{k}")(v)
    w.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ((name, t),) = list(iter_gguf_tensors(tmp_path / "k.gguf"))
    assert name == "model.layers.0.mlp.down_proj.weight" and t.shape == (rows, cols)
    ref = gguf.quants.dequantize(data, qtype)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(t.numpy(), ref)


# ---- llama3 rope scaling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),  # 3.1
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),  # 3.2
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),  # tiny
    ],
)
@pytest.mark.parametrize("theta,head_dim", [(500000.0, 128), (500000.0, 64), (10000.0, 16)])
def test_llama3_scaling_recovered_from_factors(params, theta, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def inv_freq(p):
        c = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            head_dim=head_dim,
            rope_parameters={"rope_type": "llama3", "rope_theta": theta, **p},
        )
        return ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")[0].double()

    base = 1.0 / theta ** (torch.arange(0, head_dim, 2).double() / head_dim)
    want = inv_freq(params)
    factors = (base / want).float().numpy()  # what llama.cpp stores (float32)
    got = llama3_scaling_from_factors(factors, theta, head_dim)
    if got is None:  # every frequency unscaled: nothing to recover
        assert np.allclose(factors, 1.0)
        return
    assert got["rope_type"] == "llama3" and got["factor"] == params["factor"]
    recovered = inv_freq({k: v for k, v in got.items() if k != "rope_type"})
    torch.testing.assert_close(recovered, want, rtol=1e-6, atol=0)
    if params["original_max_position_embeddings"] == 8192:
        assert (got["low_freq_factor"], got["high_freq_factor"]) == (1.0, 4.0)


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_files_are_one_line_user_errors(tmp_path, smollm2_gguf):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model\n" * 10)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[:100_000])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for p in (text, truncated, garbage, empty, tmp_path / "missing.gguf"):
        with pytest.raises(UserError) as e:
            load_gguf_config(p)
        assert "\n" not in str(e.value) and str(p.name) in str(e.value)
        with pytest.raises(UserError):
            list(iter_gguf_tensors(p))


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'bert'"):
        load_gguf_config(p)


def test_reader_matches_gguf_package(smollm2_gguf):
    """Our header parser (fast path) must see exactly what gguf.GGUFReader sees."""
    ours, ref = open_gguf(smollm2_gguf), gguf.GGUFReader(smollm2_gguf)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(ref_fields)
    for k, f in ref_fields.items():
        assert ours.fields[k].contents() == f.contents(), k
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes) == (b.name, b.tensor_type, b.n_elements, b.n_bytes)
        assert a.shape.tolist() == b.shape.tolist()
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name


def test_split_gguf(tiny_model, tmp_path):
    # llama.cpp's gguf-split layout: NAME-0000i-of-0000N.gguf, metadata in the first shard.
    expected = write_gguf(
        tiny_model("qwen2", use_sliding_window=False), tmp_path / "m.gguf", "qwen2", split_max_tensors=10
    )
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) >= 3
    for entry in (shards[0], shards[1]):  # any shard opens the whole model
        got = dict(iter_gguf_tensors(entry))
        assert set(got) == set(expected)
        for name, t in got.items():
            np.testing.assert_array_equal(t.numpy(), expected[name], err_msg=name)
        assert load_gguf_config(entry).num_layers == 3
    shards[-1].unlink()
    with pytest.raises(UserError, match="missing shard"):
        load_gguf_config(shards[0])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
def test_torch_dequantize_bit_identical_to_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (3, 5, 2 * block)  # stacked experts: [experts, rows, cols]
    blocks = rng.integers(0, 256, size=(3 * 5 * 2, size), dtype=np.uint8)
    scales = np.frombuffer((rng.standard_normal(blocks.shape[0] * 2) * 0.01).astype(np.float16).tobytes(), np.uint8)
    scales = scales.reshape(-1, 4)
    if qtype == Q.Q6_K:  # d is the block's last f16; elsewhere the first one (or two: Q4_1's m, Q4_K's dmin)
        blocks[:, -2:] = scales[:, :2]
    else:
        n = 4 if qtype in (Q.Q4_1, Q.Q4_K) else 2
        blocks[:, :n] = scales[:, :n]
    data = blocks.reshape(3, 5, -1)
    ref = gguf.quants.dequantize(data, qtype)
    got = dequantize_torch(data, qtype, shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape == ref.shape
    np.testing.assert_array_equal(got.numpy(), ref)
    assert dequantize_torch(data, Q.Q5_K, shape) is None  # no torch path: callers fall back to gguf's


# ---- Q4_0 / Q4_1 / Q8_0 weights kept quantized in our kernels ------------------------------------------------

KEPT = {
    "model.layers.{}.self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "model.layers.{}.self_attn.o_proj": ["o_proj"],
    "model.layers.{}.mlp.gate_up_proj": ["gate_proj", "up_proj"],
    "model.layers.{}.mlp.down_proj": ["down_proj"],
}


def _sources(expected: dict, module: str, layer: int, parts: list[str]) -> np.ndarray:
    """The gguf-dequantized weights of a (fused) engine module, rows concatenated like the loader fuses them."""
    parent = module.format(layer).rsplit(".", 1)[0]
    return np.concatenate([expected[f"{parent}.{p}.weight"] for p in parts])


def _param_bytes(model) -> int:
    """Resident weight bytes, a tensor shared by tied modules counted once."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


@pytest.fixture(scope="module")
def kept_gguf(tiny_model, tmp_path_factory):
    """qtype -> (tiny llama GGUF with its linears in qtype, gguf's own dequantization of every tensor)."""
    cache = {}

    def make(qtype):
        if qtype not in cache:
            path = tmp_path_factory.mktemp("kept") / f"{qtype.name}.gguf"
            cache[qtype] = path, write_gguf(tiny_model("llama"), path, "llama", qtype)
        return cache[qtype]

    return make


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_kept_as_int4_dequantizes_exactly(qtype, kept_gguf):
    from llmcli.engine.loader import load_model
    from llmcli.quant.linear import Int4OffsetLinear

    path, expected = kept_gguf(qtype)
    model, _ = load_model(path)
    dense, _ = load_model(path, dequantize=True)
    for layer in range(3):
        for module, parts in KEPT.items():
            m = model.get_submodule(module.format(layer))
            assert type(m) is Int4OffsetLinear and m.group_size == 32 and m.qweight.dtype == torch.uint8
            # Q/K rows unpermuted and q/k/v fused on the quantized tensors: still gguf's values, bit for bit
            np.testing.assert_array_equal(m.dequantize(torch.float32).numpy(), _sources(expected, module, layer, parts))
            assert type(dense.get_submodule(module.format(layer))) is torch.nn.Linear
    # the untied output projection too; a Q4 embedding table is expanded (lookups only touch a few rows)
    assert type(model.lm_head) is Int4OffsetLinear
    np.testing.assert_array_equal(model.lm_head.dequantize().numpy(), expected["lm_head.weight"])
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    np.testing.assert_array_equal(
        model.model.embed_tokens.weight.detach().numpy(), expected["model.embed_tokens.weight"]
    )
    # 4 bits + an fp16 scale and offset per 32 weights = 5 bits per weight, against 32 expanded
    lin = sum(m.in_features * m.out_features for m in model.modules() if type(m) is Int4OffsetLinear)
    assert _param_bytes(dense) - _param_bytes(model) == lin * 4 - lin * 5 // 8


def test_q8_0_kept_as_int8_rows(kept_gguf):
    # Q8_0's per-block scales are requantized to one per row (the fast CPU kernel's layout): the result is
    # exactly per-row symmetric int8 of gguf's dequantized weight, within half a row step of it.
    from llmcli.engine.loader import load_model
    from llmcli.quant.int8 import quantize_int8
    from llmcli.quant.linear import Int8Linear

    path, expected = kept_gguf(Q.Q8_0)
    model, _ = load_model(path)
    for layer in range(3):
        for module, parts in KEPT.items():
            m = model.get_submodule(module.format(layer))
            assert type(m) is Int8Linear and m.qweight.dtype == torch.int8
            ref = torch.from_numpy(_sources(expected, module, layer, parts))
            q, s = quantize_int8(ref)
            assert torch.equal(m.qweight, q) and torch.equal(m.scales, s)
            step = m.scales.float().unsqueeze(-1)
            assert ((m.dequantize() - ref).abs() <= step / 2 * (1 + 1e-3)).all()
            assert (m.dequantize() - ref).norm() / ref.norm() < 0.01
    # the embedding table and the output projection: the same per-row int8
    from llmcli.quant.embedding import Int8Embedding

    assert type(model.model.embed_tokens) is Int8Embedding and type(model.lm_head) is Int8Linear
    for m, name in ((model.model.embed_tokens, "model.embed_tokens.weight"), (model.lm_head, "lm_head.weight")):
        q, s = quantize_int8(torch.from_numpy(expected[name]))
        assert torch.equal(m.qweight, q) and torch.equal(m.scales, s), name


def test_keep_plan_needs_every_fused_part_in_one_kind():
    from llmcli.config import from_hf_dict
    from llmcli.engine.loader import gguf_keep_plan

    hf = dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    types = {"model.embed_tokens.weight": Q.Q8_0, "model.norm.weight": Q.F32, "lm_head.weight": Q.Q6_K}
    for i, (q, k, v, o, gate, up, down) in enumerate(
        [
            (Q.Q4_1, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q4_1, Q.F16),
            (Q.Q4_1, Q.Q4_1, Q.Q8_0, Q.Q6_K, Q.Q8_0, Q.Q8_0, Q.Q4_0),
        ]
    ):
        for name, t in zip(
            (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ),
            (q, k, v, o, gate, up, down),
        ):
            types[f"model.layers.{i}.{name}.weight"] = t
    plan = {m: kind for m, (kind, _) in gguf_keep_plan(from_hf_dict(hf), types).items()}
    layers = {
        "model.layers.0.self_attn.qkv_proj": "int4",
        "model.layers.0.self_attn.o_proj": "int8",
        "model.layers.1.mlp.gate_up_proj": "int8",
        "model.layers.1.mlp.down_proj": "int4",
    }
    assert plan == {**layers, "model.embed_tokens": "int8"}  # the Q6_K head is expanded
    del types["lm_head.weight"]  # tied: the head shares the int8 table; a Q4_1 table would be expanded
    assert {m: k for m, (k, _) in gguf_keep_plan(from_hf_dict({**hf, "tie_word_embeddings": True}), types).items()} == {
        **layers,
        "model.embed_tokens": "int8",
        "lm_head": "int8",
    }
    types["model.embed_tokens.weight"] = Q.F16  # tied F16 table (our own Q8_0 export): fp16 table and head
    assert {m: k for m, (k, _) in gguf_keep_plan(from_hf_dict({**hf, "tie_word_embeddings": True}), types).items()} == {
        **layers,
        "model.embed_tokens": "f16",
        "lm_head": "f16",
    }
    types["model.embed_tokens.weight"] = Q.Q4_1
    assert {
        m: k for m, (k, _) in gguf_keep_plan(from_hf_dict({**hf, "tie_word_embeddings": True}), types).items()
    } == layers


# Prefill (more than DENSE_ROWS_CPU rows) dequantizes to an fp32 matmul: for Q4_x the weights are gguf's
# exactly, so only fp32 rounding remains; Q8_0 is requantized per row (~0.7% weight error). Decode (few
# rows) runs the bf16 weight-only kernels: bf16 activations and scale tables, ~3 significant digits per
# matmul, through 3 layers.
@pytest.mark.parametrize("qtype,prefill_tol", [(Q.Q4_1, 1e-4), (Q.Q8_0, 0.03)])
def test_kept_engine_logits_close_to_dequantized(qtype, prefill_tol, kept_gguf, one_thread):
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.loader import load_model
    from llmcli.quant.linear import DENSE_ROWS_CPU

    path, _ = kept_gguf(qtype)
    engines = [LLMEngine(*load_model(path, dequantize=d), num_blocks=32) for d in (False, True)]
    ids = torch.randint(0, 256, (DENSE_ROWS_CPU + 24,), generator=torch.Generator().manual_seed(0)).tolist()
    kept, dense = (e.extend(e.add(ids[:-8]), []) for e in engines)  # 80 rows: the dense path
    assert (kept - dense).abs().max().item() < prefill_tol * dense.abs().max().item()
    seqs = [e.add(ids) for e in engines]  # 80 tokens (5 blocks) are cached now; the last 8 take the kernels
    kept, dense = (e.forward_logits([s], all_positions=True)[0] for e, s in zip(engines, seqs))
    assert kept.shape == dense.shape == (8, 256)
    err = (kept - dense).abs().max().item() / dense.abs().max().item()
    assert err < 0.03, err
    assert (kept.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.75


def test_smollm2_linears_stay_q4_1(smollm2_gguf, hf_smollm2):
    """The real file: all 30 x 4 projections load as Int4OffsetLinear equal to transformers' expanded weights;
    the tied Q8_0 embedding is one int8 table that the head's kernel shares."""
    from llmcli.engine.loader import load_model
    from llmcli.quant.embedding import Int8Embedding
    from llmcli.quant.linear import Int4OffsetLinear, Int8Linear

    model, _ = load_model(smollm2_gguf)
    kept = [n for n, m in model.named_modules() if type(m) is Int4OffsetLinear]
    assert len(kept) == 30 * 4
    emb, head = model.model.embed_tokens, model.lm_head
    assert type(emb) is Int8Embedding and type(head) is Int8Linear
    assert emb.qweight.data_ptr() == head.qweight.data_ptr() and emb.scales.data_ptr() == head.scales.data_ptr()
    # resident weights: 4-bit linears (5 bits with scale and offset) and one int8 table instead of fp32 all
    dense = sum(p.numel() for p in hf_smollm2.parameters()) * 4
    assert _param_bytes(model) < dense / 5
    ref = hf_smollm2.state_dict()
    for layer in (0, 29):
        for module, parts in KEPT.items():
            name = module.format(layer)
            want = torch.cat([ref[f"{name.rsplit('.', 1)[0]}.{p}.weight"] for p in parts])
            assert torch.equal(model.get_submodule(name).dequantize(), want), name


# ---- corrupt files: one line naming the file ---------------------------------------------------------------

_HEAD = 2_500_000  # the real file's header ends at ~1.79 MB: this prefix holds it and the first tensors


def _gguf_case(name: str, src, tmp_path):
    import struct

    with open(src, "rb") as f:
        head = f.read(_HEAD)
    klen = struct.unpack_from("<Q", head, 24)[0]  # the first key: its length, then its bytes, then its value type
    vtype = 24 + 8 + klen
    cases = {
        "empty": b"",
        "ten_bytes": head[:10],
        "header_cut": head[:2000],
        "data_truncated": head,
        "bad_magic": b"GGUX" + head[4:],
        "bad_version": head[:4] + struct.pack("<I", 7) + head[8:],
        "unknown_value_type": head[:vtype] + struct.pack("<I", 99) + head[vtype + 4 :],
        "huge_kv_count": head[:16] + struct.pack("<Q", 2**60) + head[24:],
        "huge_key_length": head[:24] + struct.pack("<Q", 2**40) + head[32:],
    }
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(cases[name])
    return p


GGUF_CASES = {
    "empty": "empty",
    "ten_bytes": "too short",
    "header_cut": "truncated",
    "data_truncated": "runs past the end of the file",
    "bad_magic": "GGUF magic",
    "bad_version": "version 7",
    "unknown_value_type": "value type 99",
    "huge_kv_count": "corrupt header counts",
    "huge_key_length": "runs past the end of the file",
}


@pytest.mark.parametrize("command", ["run", "show", "estimate", "quantize"])
@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_corrupt_gguf_is_one_line_naming_the_file(name, command, smollm2_gguf, tmp_path, capsys):
    from llmcli.cli import main

    p = _gguf_case(name, smollm2_gguf, tmp_path)
    args = {
        "run": ["run", str(p), "hi", "-n", "2"],
        "show": ["show", str(p)],
        "estimate": ["estimate", str(p)],
        "quantize": ["quantize", str(p), "-o", str(tmp_path / "out")],
    }[command]
    with pytest.raises(SystemExit) as e:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: error:"), line
    assert str(p) in line and GGUF_CASES[name] in line, line
    assert "--debug" not in line and "Traceback" not in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]  # quantize left nothing behind


def test_corrupt_gguf_through_a_process(smollm2_gguf, tmp_path):
    import os
    import subprocess
    import sys

    p = _gguf_case("data_truncated", smollm2_gguf, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "llmcli", "run", str(p), "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and str(p) in lines[0] and "truncated" in lines[0], r.stderr
