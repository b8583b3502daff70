"""Every sampling value the rules allow does what it says, at the edges; the rest are refused (SamplingParams and
parse_setting, which `llm run`'s flags and chat's /set both use)."""

from __future__ import annotations

import pytest
import torch

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampler import sample, sampling_probs
from llmcli.engine.sampling_params import MAX_SEED, SamplingParams, SettingError, parse_setting
from llmcli.engine.speculative import SpeculativeDecoder


def _logits(rows: int = 64, vocab: int = 500, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def _draw(logits: torch.Tensor, p: SamplingParams, seed: int = 1, history=None) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(logits))]
    return sample(logits.clone(), [p] * len(logits), gens, history)


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=1.0, top_p=1e-9),  # the smallest mass keeps only the top token
        SamplingParams(temperature=1.0, top_p=5e-324),
        SamplingParams(temperature=1e-30),  # logits / t overflows float32
        SamplingParams(temperature=5e-324),  # below float32's smallest number
        SamplingParams(temperature=1.0, min_p=1.0),  # only tokens as likely as the top one
        SamplingParams(temperature=1.0, top_k=1),
    ],
)
def test_limits_that_mean_greedy_are_greedy(p):
    logits = _logits()
    assert torch.equal(_draw(logits, p), logits.argmax(-1))
    probs = sampling_probs(logits, [p] * len(logits))
    assert not probs.isnan().any()


def test_top_k_past_the_vocabulary_keeps_every_token():
    logits = _logits()
    for k in (500, 501, 10**30):
        p = SamplingParams(temperature=1.0, top_k=k)
        assert torch.equal(_draw(logits, p), _draw(logits, SamplingParams(temperature=1.0)))


def test_huge_temperature_is_uniform():
    logits = _logits(rows=1, vocab=4).repeat(8000, 1)
    draws = _draw(logits, SamplingParams(temperature=1e30))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)


@pytest.mark.parametrize("penalty", [1e-30, 5e-324, 1e30, 1e300])
def test_extreme_repeat_penalties_stay_finite(penalty):
    """< 1 favours the tokens seen (a penalty near 0: only they remain), > 1 avoids them (only unseen ones)."""
    logits = _logits(rows=4)
    seen = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    for temp in (0.0, 1.0):
        p = SamplingParams(temperature=temp, repetition_penalty=penalty)
        draws = _draw(logits, p, history=seen).tolist()
        for row, tok in enumerate(draws):
            assert 0 <= tok < 500
            if penalty < 1 and (logits[row, seen[row]] > 0).any():
                assert tok in seen[row]  # a seen positive logit became (nearly) infinite
            if penalty > 1 and temp == 0:
                assert tok not in seen[row] or logits[row, tok] < 0


@pytest.mark.parametrize(
    "kw",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("nan")},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"temperature": -0.1},
        {"temperature": float("inf")},
        {"top_k": -1},
        {"min_p": 1.01},
        {"seed": MAX_SEED + 1},
        {"seed": -1},
        {"max_tokens": -1},
    ],
)
def test_sampling_params_refuse_what_the_rules_refuse(kw):
    with pytest.raises(SettingError):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("top_p", "1e-9", 1e-9),
        ("top_p", "1", 1.0),
        ("seed", str(MAX_SEED), MAX_SEED),
        ("seed", "0", 0),
        ("seed", "-1", None),
        ("repeat_penalty", "1e-30", 1e-30),
        ("min_p", "1", 1.0),
    ],
)
def test_parse_setting_takes_the_edges(name, text, value):
    assert parse_setting(name, text) == value


@pytest.mark.parametrize(
    ("name", "text"),
    [("top_p", "0"), ("seed", str(MAX_SEED + 1)), ("seed", "-2"), ("repeat_penalty", "0"), ("temperature", "nan")],
)
def test_parse_setting_refuses_past_the_edges(name, text):
    with pytest.raises(SettingError):
        parse_setting(name, text)


def test_the_largest_seed_works_in_the_engine_and_a_draft(tiny_model, one_thread):
    """torch.Generator.manual_seed takes up to 2**64 - 1; a draft model's generator (seed + 1) wraps around."""
    model, config = load_model(tiny_model("llama"))
    p = SamplingParams(temperature=1.0, seed=MAX_SEED, max_tokens=8, ignore_eos=True)
    ids = list(range(3, 20))
    runs = [[ev.token_id for ev in LLMEngine(model, config, num_blocks=64).stream(ids, p)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 8
    spec = SpeculativeDecoder(LLMEngine(model, config, num_blocks=64), LLMEngine(model, config, num_blocks=64))
    assert len(spec.generate(ids, p)) == 8
