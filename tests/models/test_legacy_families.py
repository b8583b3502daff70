"""gpt2, gpt_neox, phi, bloom and mpt (learned/partial-rotary/ALiBi positions, LayerNorm, plain MLPs, parallel
residuals) against transformers' own implementation (fp32, CPU): logits, greedy generations over the paged
cache with prompts longer than two blocks, batched and prefix-cached runs."""

from __future__ import annotations

import pytest
import torch

from llmcli.config import load_config
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.estimate import count_params

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "gpt_neox", "phi", "bloom", "mpt"]
BLOCK = 16
PROMPT_LEN = 40  # > 2 blocks
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
            path = tiny_model(family)
            model, config = load_model(path)
            cache[family] = (path, _reference(path), model, config)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_transformers(loaded, family):
    path, ref, model, config = loaded(family)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_is_transformers(loaded, family):
    path, ref, _, _ = loaded(family)
    assert count_params(load_config(path)).total == sum(p.numel() for p in ref.parameters())
