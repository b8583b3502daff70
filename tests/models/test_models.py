"""Every supported dense family against transformers' own implementation (fp32, CPU), and the real SmolLM2 GGUF."""

from __future__ import annotations

import pytest
import torch

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
PROMPT_LEN = 40  # longer than the fixtures' sliding windows (16)


def _prompt(n: int, vocab: int = 256, seed: int = 1) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(tiny_model, family):
    path = tiny_model(family)
    ref = _reference(path)
    model, config = load_model(path)
    engine = LLMEngine(model, config, block_size=16, num_blocks=32)
    ids = _prompt(PROMPT_LEN)

    # logits of every prompt position: first token, then the rest as one multi-token forward over the cache
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    seq = engine.add(ids[:1])
    got = engine.extend(seq, ids[1:])
    engine.release(seq)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-4 * max(scale, 1.0)

    # greedy generation, prompt longer than the window, 32 tokens through the paged cache
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        expect = ref.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0
        )[0, PROMPT_LEN:].tolist()
    assert out == expect


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    import transformers

    # fp32 tolerance against transformers: expand the Q4_1/Q8_0 weights like it does (kept-quantized: test_gguf)
    engine = LLMEngine.load(smollm2_gguf, device="cpu", dtype="float32", tokenizer=False, dequantize=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return engine, ref, tok


def test_smollm2_gguf_greedy_matches_transformers(smollm2):
    engine, ref, tok = smollm2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1]
        expect = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=0)[0, len(ids) :]
    seq = engine.add(ids)
    got = engine.forward_logits([seq])[0]
    engine.release(seq)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()

    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out == expect.tolist()
    assert "Paris" in tok.decode(out)
