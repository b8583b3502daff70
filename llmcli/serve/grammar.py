"""JSON-constrained decoding with llguidance: response_format json_object / json_schema and Ollama's `format`.

Grammars compiles a request's format into an llguidance grammar (refusing a bad schema as a 400) and hands the
engine a factory of JsonConstraint, the engine's TokenConstraint: before each sampled token it sets the logits
the grammar forbids to -inf, and it ends the sample when the grammar is complete. The llguidance tokenizer is
built once from the model's own `tokenizers` tokenizer (GGUF vocabularies are rebuilt as one by llmcli.tokenizer).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import torch

from llmcli.engine.async_engine import ConstraintFactory
from llmcli.serve.errors import APIError
from llmcli.tokenizer import Tokenizer

ANY_OBJECT: dict = {"type": "object"}  # json_object mode and Ollama's format "json": any JSON object
# json.dumps' separators and no other whitespace: a small model cannot wander off into endless blank space
# (llguidance's default allows any whitespace between tokens), and the output still parses the same.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class JsonConstraint:
    """One sample's grammar state (llguidance's LLMatcher) as the engine's TokenConstraint."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # 0: llguidance never prints
        self.failed = False
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool [n_vocab rounded up to 32]: the tokens the grammar allows next (llguidance's packed bitmask)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words.unsqueeze(1) >> self._bits) & 1).flatten().bool()

    def fill_mask(self, logits: torch.Tensor) -> None:
        allowed = self.allowed()
        vocab = logits.shape[-1]
        forbid = torch.ones(vocab, dtype=torch.bool)
        n = min(vocab, allowed.numel())
        forbid[:n] = ~allowed[:n]
        logits.masked_fill_(forbid.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            self.failed = True  # cannot happen for a token fill_mask allowed; end the sample rather than loop

    def is_finished(self) -> bool:
        return self.failed or self.matcher.is_stopped()


class Grammars:
    """Compiles request formats for one model's tokenizer into constraint factories."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
        )

    def json_factory(self, schema: dict | None, param: str) -> ConstraintFactory:
        """A factory of constraints for JSON matching `schema` (None: any object); 400 naming `param` if invalid."""
        grammar = self.compile(ANY_OBJECT if schema is None else schema, param)
        return lambda: JsonConstraint(self.tokenizer, grammar)

    def compile(self, schema: Any, param: str) -> str:
        if not isinstance(schema, dict):
            raise APIError(400, f"{param} must be a JSON schema object", param=param)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        if error:
            raise APIError(400, f"{param} is not a JSON schema llguidance can enforce: {error}", param=param)
        return grammar
