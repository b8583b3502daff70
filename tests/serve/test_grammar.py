"""llguidance constraints on the real SmolLM2 vocabulary: whatever the logits, the output is JSON matching the
schema (checked by parsing it and validating it independently), and bad schemas are refused with a 400."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.serve.errors import APIError
from llmcli.serve.grammar import Grammars
from llmcli.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "ok", "tags"],
    "additionalProperties": False,
}


def _valid(value) -> bool:
    """SCHEMA, checked by hand (no jsonschema in the environment)."""
    return (
        isinstance(value, dict)
        and set(value) == {"name", "ok", "tags"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 8
        and isinstance(value["ok"], bool)
        and isinstance(value["tags"], list)
        and len(value["tags"]) <= 2
        and all(t in ("a", "b") for t in value["tags"])
    )


@pytest.fixture(scope="module")
def grammars(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    return tok, Grammars(tok, tok.vocab_size, tok.eos_token_ids)


def _generate(tok, constraint, seed: int, steps: int = 200, bias: torch.Tensor | None = None) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(steps):
        logits = torch.randn(tok.vocab_size, generator=g) * 5 + (0 if bias is None else bias)
        constraint.fill_mask(logits)
        t = int(torch.distributions.Categorical(logits=logits).sample())
        ids.append(t)
        constraint.accept(t)
        if constraint.is_finished():
            break
    assert constraint.is_finished()
    return tok.decode([i for i in ids if i not in tok.eos_token_ids])


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_still_give_schema_valid_json(grammars, seed):
    tok, g = grammars
    value = json.loads(_generate(tok, g.json_factory(SCHEMA, "response_format")(), seed))
    assert _valid(value), value


def test_json_object_mode_gives_an_object(grammars):
    tok, g = grammars
    # any object is unbounded: random logits would rarely close it, so closing characters are made likely
    closing = torch.tensor([8.0 if any(c in tok.decode([i]) for c in '"}') else 0.0 for i in range(tok.vocab_size)])
    text = _generate(tok, g.json_factory(None, "format")(), 0, steps=400, bias=closing)
    assert isinstance(json.loads(text), dict)


def test_mask_covers_padded_vocab(grammars):
    """Logits rows wider than the tokenizer (models pad their vocabulary) get the extra ids forbidden."""
    tok, g = grammars
    logits = torch.zeros(tok.vocab_size + 64)
    g.json_factory(SCHEMA, "response_format")().fill_mask(logits)
    assert torch.isinf(logits[tok.vocab_size :]).all()
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).lstrip().startswith("{") or not tok.decode([i]).strip() for i in allowed)


@pytest.mark.parametrize("schema", [{"type": "bogus"}, ["not", "an", "object"]])
def test_bad_schema_is_a_400(grammars, schema):
    _, g = grammars
    with pytest.raises(APIError) as e:
        g.json_factory(schema, "response_format")
    assert e.value.status == 400 and e.value.param == "response_format"
