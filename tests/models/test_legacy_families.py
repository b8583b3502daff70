"""gpt2, gpt_neox, phi, bloom and mpt (learned/partial-rotary/ALiBi positions, LayerNorm, plain MLPs, parallel
residuals) against transformers' own implementation (fp32, CPU): logits, greedy generations over the paged
cache with prompts longer than two blocks, batched and prefix-cached runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_byte_tokenizer
from tokenizers import Tokenizer as Backend

from llmcli.config import load_config
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.speculative import SpeculativeDecoder
from llmcli.estimate import count_params
from llmcli.quant import QuantSpec
from llmcli.quant.checkpoint import quantize_checkpoint
from llmcli.quant.linear import Int4Linear, Int8Linear
from llmcli.quant.nf4 import NF4Linear

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "gpt_neox", "phi", "bloom", "mpt", "falcon"]
BLOCK = 16
PROMPT_LEN = 40  # > 2 blocks
# variants the tiny defaults leave out: gpt_neox with attention then MLP in sequence, gpt2 without 1/sqrt(d)
VARIANTS = {
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt2-unscaled": ("gpt2", {"scale_attn_weights": False}),
    # falcon-7b: multi-query attention, attention and MLP in parallel from one LayerNorm
    "falcon-7b": ("falcon", {"new_decoder_architecture": False}),
    # grouped-query attention (2 key/value heads), with biases
    "falcon-gqa": ("falcon", {"num_kv_heads": 2, "bias": True}),
    # the old layout without multi-query: q/k/v per head, attention then MLP in sequence
    "falcon-mha": ("falcon", {"new_decoder_architecture": False, "multi_query": False, "parallel_attn": False}),
}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(path):
    import transformers  # noqa: PLC0415 (the independent reference, only in tests)

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _expect(ref, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def loaded(tiny_model):
    cache = {}

    def get(family):
        if family not in cache:
            base, overrides = VARIANTS.get(family, (family, {}))
            path = tiny_model(base, **overrides)
            model, config = load_model(path)
            cache[family] = (path, _reference(path), model, config)
        return cache[family]

    return get


@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
def test_logits_and_greedy_match_transformers(loaded, family):
    _, ref, model, config = loaded(family)
    engine = LLMEngine(model, config, block_size=BLOCK, num_blocks=32)
    ids = _prompt(PROMPT_LEN)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    # first token alone, then the rest as one multi-token forward over the cache, then token by token decode
    seq = engine.add(ids[:1])
    got = engine.extend(seq, ids[1:30])
    got = torch.cat([got] + [engine.extend(seq, [t])[-1:] for t in ids[30:]])
    engine.release(seq)
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() < 1e-4 * scale
    assert engine.generate([ids], GREEDY)[0] == _expect(ref, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_and_prefix_cached_equal_single(loaded, family):
    _, ref, model, config = loaded(family)
    prompts = [_prompt(PROMPT_LEN, seed=2), _prompt(23, seed=3), _prompt(PROMPT_LEN, seed=2)[:35] + _prompt(9, seed=4)]
    single = [LLMEngine(model, config, block_size=BLOCK, num_blocks=64).generate([p], GREEDY)[0] for p in prompts]
    assert single[1] == _expect(ref, prompts[1])
    engine = LLMEngine(model, config, block_size=BLOCK, num_blocks=64)
    assert engine.generate(prompts, GREEDY) == single  # one batch, ragged lengths
    # the third prompt shares two full blocks with the first: served from the prefix cache
    seq = engine.add(prompts[2], GREEDY)
    assert seq.num_cached_prompt >= 2 * BLOCK
    engine.release(seq)
    assert engine.generate([prompts[2]], GREEDY)[0] == single[2]


@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
def test_parameter_count_is_transformers(loaded, family):
    path, ref, _, _ = loaded(family)
    assert count_params(load_config(path)).total == sum(p.numel() for p in ref.parameters())


# ---- `llm quantize` checkpoints and speculative decoding --------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "phi", "bloom", "falcon-gqa"])
def test_quantized_checkpoints_and_speculation(loaded, family, tmp_path):
    """INT8, INT4 and NF4 checkpoints of the family load quantized and stay close to the fp32 model (gpt2's
    transposed Conv1D weights quantized in the wrong orientation would not); an INT4 draft and n-gram lookup
    leave the greedy output exactly the target's."""
    path, _, model, config = loaded(family)
    target = LLMEngine(model, config, block_size=BLOCK, num_blocks=64)
    ids = _prompt(PROMPT_LEN, seed=6)
    want = target.extend(target.add(ids[:1]), ids[1:])
    # max logit error / max logit, measured at most 0.012 (int8), 0.14 (int4 rtn) and 0.16 (nf4) on random weights
    specs = {
        "int8": (QuantSpec(bits=8), Int8Linear, 0.04),
        "int4": (QuantSpec(bits=4, group_size=32), Int4Linear, 0.3),
        "nf4": (QuantSpec(bits=4, method="nf4"), NF4Linear, 0.3),
    }
    engines = {}
    for name, (spec, kind, tol) in specs.items():
        quantize_checkpoint(path, tmp_path / name, spec)
        engine = LLMEngine.load(tmp_path / name, device="cpu", tokenizer=False, kv_cache_gib=0.01)
        layer = engine.model.model.layers[0]
        assert isinstance(layer.mlp.down_proj, kind)
        # nf4 packs 64-value blocks of whole rows: bloom's 96-wide q/k/v stay 16-bit
        assert isinstance(layer.self_attn.qkv_proj, kind) or config.hidden_size % 64
        got = engine.extend(engine.add(ids[:1]), ids[1:])
        assert (got - want).abs().max().item() < tol * want.abs().max().item()
        engines[name] = engine
    plain = target.generate([ids], GREEDY)[0]
    for draft, method in ((engines["int4"], "draft"), (None, "ngram")):
        dec = SpeculativeDecoder(target, draft, method=method, num_draft=4)
        assert dec.generate(ids, GREEDY) == plain
        assert dec.stats.drafted > 0


# ---- `llm run` and `llm chat`, as a user runs them --------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _llm(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "llmcli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=300, env=env)


@pytest.mark.parametrize("family", ["bloom"])
def test_llm_run_and_chat(loaded, family, tmp_path):
    """`llm run --raw` replies with transformers' greedy continuation; a random model has no chat template, so
    `llm run` without --raw refuses in one line, and with a template in tokenizer_config.json `llm chat` answers
    with transformers' greedy reply to the rendered conversation."""
    src, ref, _, _ = loaded(family)
    d = tmp_path / family
    shutil.copytree(src, d)
    write_byte_tokenizer(d)
    tok = Backend.from_file(str(d / "tokenizer.json"))
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    r = _llm("run", str(d), text, "--raw", "--temperature", "0", "--max-tokens", "16", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    ids = tok.encode(text).ids
    with torch.no_grad():
        expect = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert json.loads(r.stdout)["text"] == tok.decode(expect[0, len(ids) :].tolist())

    r = _llm("run", str(d), text, "--temperature", "0")
    assert (
        r.returncode != 0
        and r.stderr.strip() == "error: this model has no chat template; use plain completion or pass a template"
    )

    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    prompt = tok.encode(f"<|user|>{text}\n<|assistant|>").ids
    with torch.no_grad():  # transformers stops at the config's eos as chat does; the reply shows no eos
        reply = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt) :].tolist()
    reply = [t for t in reply if t != ref.config.eos_token_id]
    r = _llm("chat", str(d), "--temperature", "0", "--max-tokens", "12", "--no-history", input=text + "\n")
    assert r.returncode == 0, r.stderr
    assert tok.decode(reply) in r.stdout
