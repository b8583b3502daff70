"""ModelConfig normalisation: every family, both key spellings, against transformers' own config objects."""

from __future__ import annotations

import json
import math

import pytest
import transformers
from conftest import TINY_CONFIGS

from llmcli.config import FULL, SLIDING, SUPPORTED_FAMILIES, from_hf_dict, load_config
from llmcli.errors import UserError

FAMILIES = sorted(TINY_CONFIGS)


def hf_config(family: str, **overrides):
    cls_name, kwargs = TINY_CONFIGS[family]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_match_transformers_config(family):
    """Sizes read from the v5 config.json equal what the transformers config object itself says."""
    hf = hf_config(family)
    mc = from_hf_dict(hf.to_dict())
    assert mc.family == family
    assert mc.vocab_size == hf.vocab_size
    assert mc.hidden_size == getattr(hf, "hidden_size", getattr(hf, "n_embd", None))
    assert mc.num_layers == getattr(hf, "num_hidden_layers", getattr(hf, "n_layer", None))
    heads = getattr(hf, "num_attention_heads", getattr(hf, "n_head", None))
    assert mc.num_heads == heads
    if family.startswith("deepseek"):  # MLA: every head has its own decompressed K/V
        assert (mc.kv_lora_rank, mc.qk_rope_head_dim, mc.v_head_dim) == (
            hf.kv_lora_rank,
            hf.qk_rope_head_dim,
            hf.v_head_dim,
        )
        assert mc.q_lora_rank == hf.q_lora_rank
    else:
        assert mc.num_kv_heads == (getattr(hf, "num_key_value_heads", None) or heads)
        assert mc.head_dim == (getattr(hf, "head_dim", None) or mc.hidden_size // heads)
    assert mc.tie_word_embeddings == hf.tie_word_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_types_match_transformers(family):
    """Which layers slide: transformers' layer_types where it has them, else its sliding_window for all."""
    hf = hf_config(family)
    mc = from_hf_dict(hf.to_dict())
    want = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not getattr(hf, "use_sliding_window", False):
        window = None
    if want and window:
        assert mc.layer_types == tuple(want)
    elif window and family != "gemma":
        assert mc.layer_types == (SLIDING,) * mc.num_layers
    else:
        assert mc.layer_types == (FULL,) * mc.num_layers
    for i, t in enumerate(mc.layer_types):
        assert mc.layer_window(i) == (window if t == SLIDING else None)


def test_rope_both_spellings():
    """rope_theta + rope_scaling (transformers v4 files) and rope_parameters (v5) normalise identically."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = from_hf_dict({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    new = from_hf_dict({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    v5 = from_hf_dict(
        transformers.LlamaConfig(
            **{k: v for k, v in base.items() if k != "model_type"}, rope_theta=500000.0, rope_scaling=scaling
        ).to_dict()
    )
    for mc in (old, new, v5):
        assert mc.rope_theta == 500000.0
        assert mc.rope_scaling["rope_type"] == "llama3" and mc.rope_scaling["factor"] == 8.0
        assert mc.rope_scaling["original_max_position_embeddings"] == 8192
    # old spelling with "type" instead of "rope_type"; "default" means no scaling
    assert (
        from_hf_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling["rope_type"] == "linear"
    )
    assert from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_scaling is None


def test_gemma3_rope_per_layer_type_and_multimodal_wrapper():
    hf = hf_config("gemma3", rope_theta=1e6, rope_local_base_freq=10000.0)
    mc = from_hf_dict(hf.to_dict())
    assert (mc.rope_theta, mc.rope_local_theta) == (1e6, 10000.0)
    text = {k: v for k, v in hf.to_dict().items() if k != "eos_token_id"}  # real files keep eos at the top
    wrapped = from_hf_dict({"model_type": "gemma3", "text_config": text, "eos_token_id": [1, 106]})
    assert wrapped.family == "gemma3" and wrapped.num_layers == mc.num_layers
    assert wrapped.layer_types == mc.layer_types and wrapped.eos_token_ids == (1, 106)


@pytest.mark.parametrize(
    "family,key",
    [
        ("mixtral", "num_local_experts"),
        ("mixtral", "num_experts"),
        ("qwen2_moe", "num_experts"),
        ("qwen2_moe", "num_local_experts"),
        ("qwen3_moe", "num_experts"),
        ("qwen3_moe", "num_local_experts"),
    ],
)
def test_expert_count_both_spellings(family, key):
    d = hf_config(family).to_dict()
    d.pop("num_experts", None)
    d.pop("num_local_experts", None)
    d[key] = 6
    mc = from_hf_dict(d)
    assert mc.num_experts == 6 and mc.is_moe


def test_moe_layer_placement():
    # qwen2_moe: sparse every decoder_sparse_step-th layer, except mlp_only_layers
    mc = from_hf_dict(hf_config("qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]).to_dict())
    assert mc.moe_layers == (False, True, False, False, False, True)
    # deepseek: dense until first_k_dense_replace, then every moe_layer_freq-th layer
    mc = from_hf_dict(hf_config("deepseek_v3", num_hidden_layers=5, first_k_dense_replace=2).to_dict())
    assert mc.moe_layers == (False, False, True, True, True)
    assert mc.shared_expert_intermediate_size == 32 and mc.router == "sigmoid"
    # mixtral: every layer; expert width is intermediate_size
    mc = from_hf_dict(hf_config("mixtral").to_dict())
    assert all(mc.moe_layers) and mc.moe_intermediate_size == mc.intermediate_size == 128


def test_family_flags():
    g2 = from_hf_dict(hf_config("gemma2").to_dict())
    assert g2.sandwich_norm and g2.norm_offset == 1.0 and g2.embedding_scale == math.sqrt(64)
    assert g2.attn_scale == 24**-0.5 and g2.attn_logit_softcap == 50.0 and g2.final_logit_softcap == 30.0
    assert from_hf_dict(hf_config("qwen3").to_dict()).qk_norm
    q2 = from_hf_dict(hf_config("qwen2").to_dict())
    assert q2.qkv_bias and not q2.o_bias
    neox = from_hf_dict(hf_config("gpt_neox").to_dict())
    assert neox.norm_type == "layer" and not neox.gated_mlp and neox.parallel_residual
    assert neox.rotary_dim == 8  # rotary_pct 0.5 of head_dim 16
    gpt2 = from_hf_dict(hf_config("gpt2").to_dict())
    assert gpt2.position_embedding == "learned" and gpt2.max_position_embeddings == 512 and gpt2.qkv_bias
    ds = from_hf_dict(hf_config("deepseek_v2").to_dict())
    assert ds.is_mla and ds.kv_values_per_token(0) == 32 + 8 and ds.qk_head_dim == 24


def test_qwen_sliding_window_off_unless_enabled():
    mc = from_hf_dict(hf_config("qwen2", use_sliding_window=False).to_dict())
    assert mc.sliding_window is None and all(mc.layer_window(i) is None for i in range(mc.num_layers))


def test_unknown_family_names_supported_ones():
    with pytest.raises(UserError) as e:
        from_hf_dict({"model_type": "bert", "hidden_size": 8})
    msg = str(e.value)
    assert "'bert'" in msg and "\n" not in msg
    for fam in SUPPORTED_FAMILIES:
        if fam != "gemma3_text":
            assert fam in msg


def test_load_config_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="no model_type"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserError, match="lacks the field"):
        load_config(tmp_path / "config.json")
