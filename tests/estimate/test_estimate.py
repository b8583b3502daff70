"""`llm estimate`: parameter counts vs transformers models, memory vs real quantizer outputs, closed-form
KV/FLOPs, the GPU-fit solver, and the CLI (json, table, errors)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS

from llmcli import estimate as E
from llmcli.config import from_hf_dict, load_config
from llmcli.errors import UserError
from llmcli.estimate.explain import explain
from llmcli.estimate.gpus import GPUS, find_gpu

# Real config.json contents of well-known checkpoints (only the fields that shape the model) and their
# published parameter totals (model cards / safetensors metadata). Each total is also checked against a
# meta-device transformers model below, so a wrong digit here fails loudly.
REAL: dict[str, tuple[dict, int | None]] = {
    "Llama-3-8B": (
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        8_030_261_248,
    ),
    "Llama-3.1-8B": (
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
        8_030_261_248,
    ),
    "Mistral-7B-v0.1": (
        dict(
            model_type="mistral",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            sliding_window=4096,
            tie_word_embeddings=False,
        ),
        7_241_732_096,
    ),
    "Mixtral-8x7B": (
        dict(
            model_type="mixtral",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        46_702_792_704,
    ),
    "SmolLM2-135M": (
        dict(
            model_type="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000,
            tie_word_embeddings=True,
        ),
        134_515_008,
    ),
    "Qwen2-0.5B": (
        dict(
            model_type="qwen2",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            sliding_window=131072,
            use_sliding_window=False,
            max_window_layers=24,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
        494_032_768,
    ),
    "Qwen2.5-7B": (
        dict(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            sliding_window=131072,
            use_sliding_window=False,
            max_window_layers=28,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
        7_615_616_512,
    ),
    "Gemma-7B": (
        dict(
            model_type="gemma",
            vocab_size=256000,
            hidden_size=3072,
            intermediate_size=24576,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_activation="gelu_pytorch_tanh",
        ),
        8_537_680_896,
    ),
    "Gemma-2-2B": (
        dict(
            model_type="gemma2",
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=4096,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            max_position_embeddings=8192,
        ),
        2_614_341_888,
    ),
    "Gemma-3-1B": (
        dict(
            model_type="gemma3_text",
            vocab_size=262144,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            sliding_window_pattern=6,
            query_pre_attn_scalar=256,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rope_local_base_freq=10000.0,
        ),
        999_885_952,
    ),
    "Phi-3-mini-4k": (
        dict(
            model_type="phi3",
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            sliding_window=2047,
            tie_word_embeddings=False,
            pad_token_id=32000,
            eos_token_id=32000,
            bos_token_id=1,
        ),
        3_821_079_552,
    ),
    "GPT-2": (
        dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
        124_439_808,
    ),
    "Pythia-160m": (
        dict(
            model_type="gpt_neox",
            vocab_size=50304,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            rotary_pct=0.25,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            use_parallel_residual=True,
        ),
        162_322_944,
    ),
    "Phi-2": (
        dict(
            model_type="phi",
            vocab_size=51200,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            partial_rotary_factor=0.4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        2_779_683_840,
    ),
    "BLOOM-560m": (
        dict(model_type="bloom", vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
        559_214_592,
    ),
    "MPT-7B": (
        dict(
            model_type="mpt",
            vocab_size=50432,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            max_seq_len=2048,
            expansion_ratio=4,
            no_bias=True,
            attn_config={"alibi": True, "alibi_bias_max": 8},
        ),
        6_649_286_656,
    ),
    "Falcon-7B": (
        dict(
            model_type="falcon",
            vocab_size=65024,
            hidden_size=4544,
            num_hidden_layers=32,
            num_attention_heads=71,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
        ),
        6_921_720_704,
    ),
    "Qwen1.5-MoE-A2.7B": (
        dict(
            model_type="qwen2_moe",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=60,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        14_315_784_192,
    ),
    "Qwen3-30B-A3B": (
        dict(
            model_type="qwen3_moe",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=40960,
            tie_word_embeddings=False,
            norm_topk_prob=True,
        ),
        30_532_122_624,
    ),
    "DeepSeek-V2-Lite": (
        dict(
            model_type="deepseek_v2",
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            max_position_embeddings=163840,
            tie_word_embeddings=False,
        ),
        15_706_484_224,
    ),
    "DeepSeek-V3": (
        dict(
            model_type="deepseek_v3",
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            first_k_dense_replace=3,
            moe_layer_freq=1,
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            max_position_embeddings=163840,
            rope_scaling=dict(
                type="yarn",
                factor=40,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=1.0,
                original_max_position_embeddings=4096,
            ),
            tie_word_embeddings=False,
        ),
        None,
    ),  # published as "671B total, 37B activated"
}

ROOT = Path(__file__).resolve().parents[2]


def meta_model(hf_config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def reference_counts(model, num_experts: int, top_k: int) -> tuple[int, int, int]:
    """(total, active, embedding) straight from a transformers module tree."""
    params = dict(model.named_parameters())  # deduplicates tied weights
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for n, p in params.items() if re.search(r"\.experts\.", n))
    active = total - (routed // num_experts * (num_experts - top_k) if num_experts else 0)
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = model.get_output_embeddings().weight
    emb_ids.add(id(out))
    embedding = sum(p.numel() for p in params.values() if id(p) in emb_ids)
    return total, active, embedding


def check_counts(cfg_dict: dict, hf_config) -> E.ParamCount:
    mc = from_hf_dict(cfg_dict)
    pc = E.count_params(mc)
    total, active, embedding = reference_counts(meta_model(hf_config), mc.num_experts, mc.num_experts_per_tok)
    assert (pc.total, pc.active, pc.embedding) == (total, active, embedding)
    assert pc.non_embedding == total - embedding
    return pc


# ---- parameter counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_params_tiny_models_match_transformers(family, tiny_model):
    """Every family: the config.json transformers itself wrote (v5 key spellings) -> exact module counts."""
    d = tiny_model(family)
    cfg = json.loads((d / "config.json").read_text())
    check_counts(cfg, transformers.AutoConfig.from_pretrained(d))


@pytest.mark.parametrize("name", sorted(REAL))
def test_params_real_configs_match_transformers_and_published(name):
    cfg, published = REAL[name]
    pc = check_counts(cfg, transformers.AutoConfig.for_model(**cfg))
    if published is not None:
        assert pc.total == published


def test_deepseek_v3_is_671b_total_37b_active():
    pc = E.count_params(from_hf_dict(REAL["DeepSeek-V3"][0]))
    assert round(pc.total / 1e9) == 671 and int(pc.active / 1e9) == 37


def test_moe_variants_match_transformers():
    """decoder_sparse_step / mlp_only_layers, no shared expert, first_k_dense_replace with q_lora."""
    for family, kw in [
        (
            "qwen2_moe",
            dict(decoder_sparse_step=2, mlp_only_layers=[], shared_expert_intermediate_size=0, num_hidden_layers=4),
        ),
        ("qwen3_moe", dict(mlp_only_layers=[0, 2], tie_word_embeddings=True)),
        ("deepseek_v3", dict(first_k_dense_replace=2, n_shared_experts=2, num_hidden_layers=4)),
        ("deepseek_v2", dict(q_lora_rank=16, attention_bias=True)),
        ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
        ("phi3", dict(tie_word_embeddings=True)),
    ]:
        hf = getattr(transformers, TINY_CONFIGS[family][0])(**{**TINY_CONFIGS[family][1], **kw})
        check_counts(hf.to_dict(), hf)


# ---- weight memory ------------------------------------------------------------------------------------------


def test_group_size_rule():
    """The requested group size, else the largest power of two >= 16 below it dividing the width, else the row."""
    for k in [64, 96, 100, 128, 160, 576, 1408, 2047, 2048, 4864, 11008, 18944]:
        for g in (32, 64, 128):
            want = max((d for d in (16, 32, 64, 128) if d <= g and k % d == 0), default=k)
            assert E.effective_group_size(k, g) == want
    assert E.effective_group_size(576, 128) == 64  # SmolLM2's hidden size


@pytest.mark.parametrize(
    "shape,g", [((256, 512), 128), ((96, 192), 128), ((48, 96), 64), ((40, 80), 128), ((8, 100), 32)]
)
def test_matrix_bytes_match_real_quantizers(shape, g):
    """Bytes of the tensors our INT8/INT4 quantizers and bitsandbytes NF4 actually produce."""
    from bitsandbytes import functional as bnbf

    from llmcli.quant.int4 import pack_int4, quantize_int4_rtn
    from llmcli.quant.int8 import quantize_int8

    w = torch.randn(*shape)
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert E.matrix_bytes(*shape, "int8") == nbytes(*quantize_int8(w))
    q, scales, zeros = quantize_int4_rtn(w, g)
    assert E.matrix_bytes(*shape, "int4", g) == nbytes(pack_int4(q), scales, zeros)
    q, st = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert E.matrix_bytes(*shape, "nf4") == nbytes(q, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset)
    assert E.matrix_bytes(*shape, "bf16") == 2 * w.numel() and E.matrix_bytes(*shape, "fp32") == 4 * w.numel()


def test_int4_overhead_closed_form():
    # 4096x4096, g128: half a byte per weight + (fp16 scale + fp16 zero) per 128 weights = 4.25 bits/weight
    assert E.matrix_bytes(4096, 4096, "int4", 128) == 4096 * 4096 // 2 + 4096 * 32 * 4
    assert E.matrix_bytes(4096, 4096, "int4", 32) == 4096 * 4096 // 2 + 4096 * 128 * 4
    # an input size 128 does not divide (1344 = 64 * 21) falls back to groups of 64
    assert E.matrix_bytes(10, 1344, "int4", 128) == 10 * 1344 // 2 + 10 * (1344 // 64) * 4


def test_weight_bytes_llama3_closed_form():
    mc = from_hf_dict(REAL["Llama-3-8B"][0])
    n = 8_030_261_248
    assert E.weight_bytes(mc, "bf16") == 2 * n and E.weight_bytes(mc, "fp32") == 4 * n
    L, d, kv, inter, V = 32, 4096, 1024, 14336, 128256
    # per layer: q, o [d, d]; k, v [kv, d]; gate, up [inter, d]; down [d, inter]
    rows_int8 = L * (2 * (d * d + 2 * d) + 2 * (kv * d + 2 * kv) + 2 * (inter * d + 2 * inter) + (d * inter + 2 * d))
    packed = L * (2 * d * d + 2 * kv * d + 3 * inter * d)
    assert E.weight_bytes(mc, "int8") == rows_int8 + 2 * (n - packed)
    int4 = packed // 2 + 4 * L * (2 * d * d // 128 + 2 * kv * d // 128 + 2 * inter * d // 128 + d * inter // 128)
    assert E.weight_bytes(mc, "int4", 128) == int4 + 2 * (n - packed)
    # token table and lm_head packed too with --quantize-embeddings (untied: two packed [V, d] tables)
    assert E.weight_bytes(mc, "int4", 128, quantize_embeddings=True) == (
        E.weight_bytes(mc, "int4", 128) - 2 * 2 * V * d + 2 * E.matrix_bytes(V, d, "int4", 128)
    )


@pytest.mark.parametrize("bits,group,head", [(8, None, True), (4, 32, False)])
def test_weight_bytes_match_llm_quantize_checkpoint(tmp_path, tiny_model, bits, group, head):
    """A dense model quantized by `llm quantize`: the estimate from the source config is the checkpoint's
    tensor bytes, and the quantized directory defaults --dtype/--group-size to its quantization_config.
    (qwen3 tiny ties its embeddings: with --quantize-embeddings its one table is stored packed, once.)"""
    from safetensors import safe_open

    src = tiny_model("qwen3", num_hidden_layers=2)
    out = tmp_path / "q"
    args = ["quantize", str(src), "--bits", str(bits), "--method", "rtn", "-o", str(out)]
    r = llm(*args, *(["--group-size", str(group)] if group else []), *(["--quantize-embeddings"] if head else []))
    assert r.returncode == 0, r.stderr
    stored = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                stored += t.numel() * t.element_size()
    dtype = "int8" if bits == 8 else "int4"
    assert E.weight_bytes(load_config(src), dtype, group or 128, quantize_embeddings=head) == stored
    j = json.loads(llm("estimate", str(out), "--json").stdout)
    assert j["dtype"] == dtype and j["weight_bytes"] == stored
    if group:
        assert j["group_size"] == group


# ---- KV cache -----------------------------------------------------------------------------------------------


def test_kv_closed_forms():
    l3 = from_hf_dict(REAL["Llama-3-8B"][0])
    assert E.kv_bytes_per_token(l3) == 2 * 32 * 8 * 128 * 2  # 128 KiB: GQA, 8 of 32 heads
    # fp8 as the engine caches it: a byte a value and a float16 scale per (K or V, KV head) of a token
    assert E.kv_bytes(l3, 8192, 4, "fp8") == 2 * 32 * 8 * (128 + 2) * 8192 * 4
    assert E.kv_bytes_per_token(l3, "fp32") == 2 * E.kv_bytes_per_token(l3, "fp16")
    # MHA: phi3 caches all 32 heads (its 2047 window caps long contexts). Counted in the engine's 16-token blocks:
    # 1000 tokens fill 63 of them; at 4096 the window needs the blocks from position 4096 - 2047 + 1 = 2050 on,
    # i.e. blocks 128..255 (2048 tokens)
    phi = from_hf_dict(REAL["Phi-3-mini-4k"][0])
    assert E.kv_bytes(phi, 1000) == 2 * 32 * 3072 * 2 * 1008
    assert E.kv_bytes(phi, 4096) == 2 * 32 * 3072 * 2 * 2048
    # MLA: one 512-dim latent + 64-dim rope key per layer, independent of the 128 heads
    v3 = from_hf_dict(REAL["DeepSeek-V3"][0])
    assert E.kv_bytes_per_token(v3) == 61 * (512 + 64) * 2
    assert E.kv_bytes(v3, 100_000, 2) == 61 * 576 * 2 * 100_000 * 2
    # Mistral: every layer slides over 4096 tokens
    m = from_hf_dict(REAL["Mistral-7B-v0.1"][0])
    assert E.kv_bytes(m, 32768) == E.kv_bytes(m, 4096) == 2 * 32 * 8 * 128 * 2 * 4096
    # Gemma-2: 13 of 26 layers slide over 4096; Gemma-3: 5 of every 6 over 512 (26 layers: 22 sliding)
    g2 = from_hf_dict(REAL["Gemma-2-2B"][0])
    per = 2 * 4 * 256 * 2
    assert E.kv_bytes(g2, 8192) == 13 * per * 8192 + 13 * per * 4096
    g3 = from_hf_dict(REAL["Gemma-3-1B"][0])
    per = 2 * 1 * 256 * 2
    assert E.kv_bytes(g3, 32768) == 4 * per * 32768 + 22 * per * 512


def test_kv_agrees_with_engine_view(tiny_model):
    """The estimate sums exactly what ModelConfig tells the engine each layer caches, in the engine's blocks."""
    for fam in ("qwen2", "gemma3", "deepseek_v2"):
        mc = load_config(tiny_model(fam))

        # 100 tokens: 7 blocks of 16; a window w keeps those from the block of position 100 - w + 1 on
        def blocks(w):
            return 7 - (max(0, 100 - w + 1) // 16 if w else 0)

        want = sum(mc.kv_values_per_token(i) * 16 * blocks(mc.layer_window(i)) for i in range(mc.num_layers))
        assert E.kv_bytes(mc, 100, 3, "fp16") == want * 3 * 2


# ---- FLOPs --------------------------------------------------------------------------------------------------


def test_flops_llama3_closed_form():
    mc = from_hf_dict(REAL["Llama-3-8B"][0])
    L, d, kv, inter, V, H, hd = 32, 4096, 1024, 14336, 128256, 32, 128
    matmul = L * (2 * d * d + 2 * kv * d + 3 * inter * d) + V * d  # embedding lookup is not a matmul
    ctx = 4096
    assert E.flops_per_token(mc, ctx) == 2 * matmul + L * 2 * 2 * H * hd * ctx


def test_flops_moe_counts_active_experts_and_windows():
    mx = from_hf_dict(REAL["Mixtral-8x7B"][0])
    pc = E.count_params(mx)
    norms = 32 * 2 * 4096 + 4096
    assert E.matmul_params(mx) == pc.active - 32000 * 4096 - norms  # routers included, the lookup not
    m = from_hf_dict(REAL["Mistral-7B-v0.1"][0])
    assert E.attention_flops(m, 32768) == E.attention_flops(m, 4096)  # window-limited


# ---- fit solver ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Llama-3-8B", "Gemma-2-2B", "DeepSeek-V2-Lite", "Phi-3-mini-4k"])
@pytest.mark.parametrize("dtype", ["bf16", "int4"])
def test_fit_solver_is_tight(name, dtype):
    mc = from_hf_dict(REAL[name][0])
    opts = E.Options(dtype=dtype, context=1024, batch=3, kv_dtype="fp16")
    w = E.weight_bytes(mc, dtype)
    # a budget that holds the weights and ~a third of the model's full context at batch 3
    budget = E.total_bytes(mc, opts, mc.max_position_embeddings // 3, 3) + 12345
    c = E.max_context(mc, opts, budget)
    assert 0 < c < mc.max_position_embeddings
    assert E.total_bytes(mc, opts, c, 3) <= budget < E.total_bytes(mc, opts, c + 1, 3)
    b = E.max_batch(mc, opts, budget)
    assert E.total_bytes(mc, opts, 1024, b) <= budget < E.total_bytes(mc, opts, 1024, b + 1)
    assert E.max_context(mc, opts, w) == 0 and E.max_batch(mc, opts, w) == 0


def test_fit_all_sliding_model_is_capped_by_model_not_memory():
    """Mistral's cache stops growing at its 4096 window, so memory never limits the context."""
    m = from_hf_dict(REAL["Mistral-7B-v0.1"][0])
    opts = E.Options(batch=1)
    budget = E.total_bytes(m, opts, 4096, 1)
    assert E.max_context(m, opts, budget) == m.max_position_embeddings


def test_estimate_fit_fields_agree():
    mc = from_hf_dict(REAL["Llama-3-8B"][0])
    est = E.estimate(mc, E.Options(dtype="int4", context=8192, batch=1, gpu_bytes=find_gpu("rtx-4090").memory_bytes))
    assert est.total_bytes == est.weight_bytes + est.kv_bytes + est.activation_bytes
    assert est.fits and est.max_context == 8192 and est.max_batch >= 1
    assert est.usable_bytes == 24564 * 2**20 - 2**30


def test_gpu_table():
    assert find_gpu("H100-80GB").memory_bytes == 81559 * 2**20
    assert find_gpu("h100 80gb") is find_gpu("H100-80GB") and find_gpu("4090").name == "RTX-4090"
    assert len({g.name for g in GPUS}) == len(GPUS)
    with pytest.raises(UserError, match="known: .*H100-80GB.*T4"):
        find_gpu("GTX-480")


def test_explain_names_the_rule_of_thumb_error():
    mc = from_hf_dict(REAL["Llama-3-8B"][0])
    opts = E.Options()
    text = "\n".join(explain(mc, opts, E.estimate(mc, opts)))
    assert "12*L*d^2" in text and "2*L*d*bytes" in text
    assert "4.00x" in text and "GQA" in text  # naive KV: 32 heads assumed, 8 cached
    v3 = from_hf_dict(REAL["DeepSeek-V3"][0])
    text = "\n".join(explain(v3, opts, E.estimate(v3, opts)))
    assert "MLA" in text and "MoE" in text and f"{2 * 61 * 7168 / (61 * 576):.2f}x" in text


# ---- CLI ----------------------------------------------------------------------------------------------------


def llm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmcli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def write_config(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_cli_json_keys_and_values(tmp_path):
    d = write_config(tmp_path / "mixtral", REAL["Mixtral-8x7B"][0])
    r = llm("estimate", str(d), "--json", "--gpu", "H100-80GB", "--context", "8192", "--batch", "2")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    for k in (
        "params_total",
        "params_active",
        "params_embedding",
        "weight_bytes",
        "kv_bytes_per_token",
        "kv_bytes",
        "activation_bytes",
        "total_bytes",
        "flops_per_token",
        "fits",
        "max_context",
        "max_batch",
    ):
        assert k in j, k
    assert "explain" not in j  # only with --explain
    assert j["params_total"] == 46_702_792_704 and j["weight_bytes"] == 2 * 46_702_792_704
    assert j["kv_bytes"] == 2 * 32 * 8 * 128 * 2 * 8192 * 2 and j["fits"] is False  # 87 GiB of bf16 weights
    r = llm("estimate", str(d / "config.json"), "--json", "--dtype", "int4", "--gpu-memory", "48")
    j = json.loads(r.stdout)
    assert j["fits"] is True and j["dtype"] == "int4" and j["gpu_bytes"] == 48 * 2**30


def test_cli_gguf_and_table(smollm2_gguf):
    r = llm("estimate", str(smollm2_gguf), "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["params_total"] == 134_515_008 and j["context"] == 4096
    r = llm("estimate", str(smollm2_gguf), "--gpu", "T4", "--explain")
    assert r.returncode == 0 and "134,515,008" in r.stdout and "T4" in r.stdout and "rule of thumb" in r.stdout


def test_cli_bnb_nf4_dir_defaults_dtype(tmp_path):
    cfg = dict(
        REAL["SmolLM2-135M"][0],
        quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    )
    j = json.loads(llm("estimate", str(write_config(tmp_path / "nf4", cfg)), "--json").stdout)
    assert j["dtype"] == "nf4" and j["weight_bytes"] == E.weight_bytes(from_hf_dict(cfg), "nf4")


def test_cli_hub_repo_from_offline_cache(tmp_path):
    """A repo id reads config.json through huggingface_hub; offline, from its cache."""
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    write_config(snap, REAL["GPT-2"][0])
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = llm("estimate", "acme/tiny", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params_total"] == 124_439_808
    r = llm("estimate", "acme/missing", env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "not in the local cache" in r.stderr


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    unknown = write_config(tmp_path / "bert", {"model_type": "bert", "hidden_size": 8})
    good = write_config(tmp_path / "ok", REAL["GPT-2"][0])
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    cases = [
        ([str(tmp_path / "nope")], "no such file"),
        ([str(tmp_path / "bad")], "not valid JSON"),
        ([str(unknown)], "supported: llama"),
        ([str(good), "--gpu", "GTX-480"], "unknown GPU"),
        ([str(good), "--dtype", "int3"], "--dtype"),
        ([str(good), "--kv-dtype", "int4"], "--kv-dtype"),
        ([str(good), "--group-size", "100"], "--group-size"),
        ([str(good), "--context", "0"], "at least 1"),
        ([str(good), "--gpu", "T4", "--gpu-memory", "8"], "not both"),
        ([str(tmp_path / "x.gguf")], "x.gguf"),
    ]
    for args, msg in cases:
        r = llm("estimate", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert msg in lines[0], (args, lines[0])


def test_cli_takes_every_name_llm_list_shows(tmp_path, tiny_model, smollm2_gguf):
    """Store directories and .gguf files, the default model's name and cached Hub repos, as `llm list` names them;
    the parameters agree with the ones `llm list` counts from the tensors."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(tiny_model("llama"), home / "models" / "tiny-int8")
    (home / "models" / "smol.Q4_1.gguf").symlink_to(smollm2_gguf)
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model("qwen3"), snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    env = {
        "LLMCLI_HOME": str(home),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "LLMCLI_DEFAULT_MODEL": str(smollm2_gguf),
    }
    r = llm("list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(listed) == {"smollm2-135m-instruct", "tiny-int8", "smol.Q4_1.gguf", "acme/tiny"}
    for name, m in listed.items():
        r = llm("estimate", name, "--json", env=env)
        assert r.returncode == 0, (name, r.stderr)
        assert json.loads(r.stdout)["params_total"] == m["params"], name
    r = llm("estimate", ".hidden", env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_cli_gguf_weights_are_its_tensor_types(smollm2_gguf):
    """Default: the checkpoint's quantization, i.e. every tensor's bytes for its own GGUF type (computed here from
    gguf's block sizes); --dtype still asks for another type."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    want = 0
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        want += int(t.n_elements) // block * size
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    assert kinds["Q4_1"] > 100  # the file really is mostly Q4_1
    j = json.loads(llm("estimate", str(smollm2_gguf), "--json").stdout)
    assert j["dtype"] == "q4_1" and j["weight_bytes"] == want and j["stored_tensor_types"] == kinds
    assert j["total_bytes"] == want + j["kv_bytes"] + j["activation_bytes"]
    j = json.loads(llm("estimate", str(smollm2_gguf), "--json", "--dtype", "bf16").stdout)
    assert j["dtype"] == "bf16" and j["weight_bytes"] == 2 * j["params_total"] and "stored_tensor_types" not in j


def test_kv_blocks_rule_and_its_bound():
    """A window w keeps the blocks from the one holding position n - w + 1 on; the most at any context is
    ceil((w + bs - 2) / bs), checked by brute force over every context up to a few windows."""
    for w in (1, 2, 15, 16, 17, 20, 33, 4096):
        for bs in (1, 16):
            counts = [E.kv_blocks(n, w, bs) for n in range(1, 3 * w + 64)]
            # the next token's w - 1 older keys (positions n - w + 1 .. n - 1) are all in the blocks kept
            assert all(c * bs >= min(n, w - 1) for n, c in zip(range(1, 3 * w + 64), counts))
            assert max(counts) == -(-(w + bs - 2) // bs) == E.kv_blocks_max(w, bs)
    assert E.kv_blocks(100, None) == 7
