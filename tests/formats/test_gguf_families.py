"""gpt2, gptneox, phi2, bloom and mpt GGUFs, written here the way llama.cpp's converter writes them (tensor names
from gguf-py's own map, gpt2's Conv1D weights transposed, gpt_neox/bloom q/k/v regrouped from per-head to
[q; k; v], the metadata keys of each architecture, a gpt2-style BPE vocabulary), loaded by the engine: logits and
greedy generations equal transformers' on the same weights (F32), Q8_0 kept quantized runs close to them."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import regex
import torch
from conftest import write_byte_tokenizer
from safetensors.torch import load_file
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from llmcli.config import load_config
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.quant.linear import Int8Linear
from llmcli.tokenizer import load_tokenizer
from llmcli.tokenizer.gguf_vocab import PRE_TOKENIZERS, gguf_bpe

pytestmark = pytest.mark.usefixtures("one_thread")

Q = gguf.GGMLQuantizationType
# family -> (llama.cpp architecture, tokenizer.ggml.pre its converter writes for such a model)
ARCHS = {
    "gpt2": ("gpt2", "gpt-2"),
    "gpt_neox": ("gptneox", "gpt-2"),
    "phi": ("phi2", "phi-2"),
    "bloom": ("bloom", "bloom"),
    "mpt": ("mpt", "mpt"),
    "falcon": ("falcon", "falcon"),
}
# falcon-7b (multi-query, one LayerNorm: no attn_norm_2) and grouped-query attention with biases
VARIANTS = {
    "falcon-7b": ("falcon", {"new_decoder_architecture": False}),
    "falcon-gqa": ("falcon", {"num_kv_heads": 2, "bias": True}),
}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def _kv_heads(family: str, cfg: dict) -> int:
    heads = cfg.get("n_head") or cfg.get("n_heads") or cfg["num_attention_heads"]
    if family == "falcon":  # multi-query: one key/value head (the converter's default without num_kv_heads)
        return cfg["num_kv_heads"] if cfg["new_decoder_architecture"] else 1
    return cfg.get("num_key_value_heads") or heads


def _metadata(w: gguf.GGUFWriter, family: str, cfg: dict) -> None:
    """The <arch>.* keys llama.cpp's converter writes for each architecture."""
    hidden = cfg.get("n_embd") or cfg.get("d_model") or cfg["hidden_size"]
    heads = cfg.get("n_head") or cfg.get("n_heads") or cfg["num_attention_heads"]
    w.add_embedding_length(hidden)
    w.add_block_count(cfg.get("n_layer") or cfg.get("n_layers") or cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(_kv_heads(family, cfg))
    w.add_feed_forward_length(
        cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or cfg.get("n_inner") or 4 * hidden
    )
    w.add_context_length(cfg.get("n_positions") or cfg.get("max_seq_len") or cfg.get("max_position_embeddings", 2048))
    w.add_layer_norm_eps(cfg.get("layer_norm_epsilon") or cfg.get("layer_norm_eps"))
    rope = cfg.get("rope_parameters") or {}
    if family in ("gpt_neox", "phi"):
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * hidden // heads))
        w.add_rope_freq_base(rope["rope_theta"])
    if family == "gpt_neox":
        w.add_parallel_residual(cfg["use_parallel_residual"])
    if family == "mpt":
        w.add_max_alibi_bias(cfg["attn_config"]["alibi_bias_max"])
        w.add_clamp_kqv(cfg["attn_config"]["clip_qkv"])


def _tokenizer(w: gguf.GGUFWriter, src, pre: str) -> None:
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_family_gguf(src, path, family: str, qtype=Q.F32) -> None:
    cfg = json.loads((src / "config.json").read_text())
    arch, pre = ARCHS[family]
    n = cfg.get("n_layer") or cfg.get("n_layers") or cfg["num_hidden_layers"]
    heads = cfg.get("n_head") or cfg.get("n_heads") or cfg["num_attention_heads"]
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n)
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, family, cfg)
    _tokenizer(w, src, pre)
    for name, t in load_file(src / "model.safetensors").items():
        if family == "bloom":
            name = name.removeprefix("transformer.")  # llama.cpp's bloom converter strips it before mapping
        base, _, suffix = name.rpartition(".")
        t = t.numpy()
        if family == "gpt2" and name.endswith(CONV1D):
            t = t.T
        if family in ("gpt_neox", "bloom") and "query_key_value" in name:  # per head [q, k, v] -> [q; k; v]
            t = t.reshape(heads, 3, -1, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        if family == "falcon" and "query_key_value" in name:  # per kv group [q.., k, v] -> [q; k; v]
            kv = _kv_heads(family, cfg)
            g = t.reshape(kv, heads // kv + 2, -1, *t.shape[1:])
            parts = (g[:, :-2], g[:, -2], g[:, -1])
            t = np.concatenate([p.reshape(-1, *t.shape[1:]) for p in parts])
        gname = names.get_name(base)
        assert gname is not None, name
        q = qtype if t.ndim == 2 and t.shape[-1] % 32 == 0 else Q.F32
        w.add_tensor(f"{gname}.{suffix}", gguf.quants.quantize(np.ascontiguousarray(t, np.float32), q), raw_dtype=q)
        if family == "gpt2" and gname == "token_embd":  # the converter writes gpt2's tied head as its own tensor
            w.add_tensor("output.weight", gguf.quants.quantize(np.ascontiguousarray(t, np.float32), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _prompt(n: int = 40) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def family_gguf(tiny_model, tmp_path_factory):
    cache = {}

    def make(variant: str, qtype=Q.F32):
        family, overrides = VARIANTS.get(variant, (variant, {}))
        if (variant, qtype) not in cache:
            src = tiny_model(family, **overrides)
            if not (src / "tokenizer.json").is_file():
                write_byte_tokenizer(src)
            path = tmp_path_factory.mktemp(f"gguf-{variant}") / f"{variant}-{qtype.name}.gguf"
            write_family_gguf(src, path, family, qtype)
            cache[variant, qtype] = (src, path)
        return cache[variant, qtype]

    return make


@pytest.mark.parametrize("family", [*ARCHS, *VARIANTS])
def test_gguf_runs_like_transformers(family_gguf, family):
    import transformers  # noqa: PLC0415 (the reference, only in tests)

    src, path = family_gguf(family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours, want = load_gguf_config(path).to_dict(), load_config(src).to_dict()
    for key in ("torch_dtype", "bos_token_id", "eos_token_ids", "tie_word_embeddings"):
        ours.pop(key), want.pop(key)
    for key in ("norm_eps", "qkv_clip"):  # stored as float32
        a, b = ours.pop(key), want.pop(key)
        assert a == b or a == pytest.approx(b, rel=1e-6), key
    assert ours == want
    model, config = load_model(path)
    engine = LLMEngine(model, config, block_size=16, num_blocks=32)
    ids = _prompt()
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
        expect = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, 40:]
    seq = engine.add(ids[:1])
    got = engine.extend(seq, ids[1:])
    engine.release(seq)
    assert (got - logits).abs().max().item() < 1e-4 * max(logits.abs().max().item(), 1.0)
    assert engine.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0] == expect.tolist()


@pytest.mark.parametrize("family", list(ARCHS))
def test_gguf_tokenizer_is_the_source_tokenizer(family_gguf, family):
    src, path = family_gguf(family)
    text = "Hello, world! It's 2024 -- naïve café 日本 😀\n  spaces"
    tok, want = load_tokenizer(path), Backend.from_file(str(src / "tokenizer.json"))
    assert tok.encode(text, add_special_tokens=False) == want.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("family", ["gpt2", "bloom", "phi"])
def test_q8_0_gguf_stays_quantized_and_close(family_gguf, family):
    _, f32 = family_gguf(family)
    _, q8 = family_gguf(family, Q.Q8_0)
    ref_model, config = load_model(f32)
    model, _ = load_model(q8)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    ids = _prompt()
    logits = []
    for m in (ref_model, model):
        engine = LLMEngine(m, config, block_size=16, num_blocks=32)
        logits.append(engine.extend(engine.add(ids[:1]), ids[1:]))
    want, got = logits
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


def _llama_cpp_split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex in turn cuts every fragment into its matches and the text
    between them (both kept), written with the `regex` module as an independent statement of the rule."""
    pieces = [text]
    for r in regexes:
        out = []
        for p in pieces:
            pos = 0
            for m in regex.finditer(r, p):
                out += [x for x in (p[pos : m.start()], m.group()) if x]
                pos = m.end()
            out += [p[pos:]] if pos < len(p) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", ["falcon", "bloom"])
def test_regex_pre_tokenizers_split_as_llama_cpp(pre):
    """The tokenizer.ggml.pre names whose split is a regex list: the rebuilt pre-tokenizer cuts text where
    llama.cpp's rule does (then spells each piece in GPT-2's byte alphabet)."""
    rule = PRE_TOKENIZERS[pre][0]
    text = "Hello, world!! It's 1234567 -- naïve (café) 日本語。 a+b<=c `x`  $5\n\tend"
    got = [
        p
        for p, _ in gguf_bpe(
            {"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.pre": pre}
        ).pre_tokenizer.pre_tokenize_str(text)
    ]
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    want = [spell.pre_tokenize_str(p)[0][0] for p in _llama_cpp_split(text, (rule,) if isinstance(rule, str) else rule)]
    assert got == want
