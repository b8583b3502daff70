"""`llm chat` names the KV cache when its budget, not the model, sets the context (and says nothing otherwise)."""

from __future__ import annotations

from conftest import tiny_engine
from test_chat import EchoBackend, session

from llmcli.chat.backend import kv_limit_words
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model


def test_kv_budget_is_named_when_it_is_the_limit(tiny_model):
    loaded = load_model(tiny_model("llama"))  # a 512-token context
    assert kv_limit_words(tiny_engine(loaded, num_blocks=512)) == ""  # 2,048 tokens of pool: the model is the limit
    small = LLMEngine(*loaded, block_size=16, num_blocks=8, kv_dtype="int8")
    words = kv_limit_words(small)
    assert small.context_len == 128 and "the KV cache (128 tokens at --kv-dtype int8" in words and "512" in words


def test_session_says_which_limit_when_turns_are_dropped():
    b = EchoBackend()
    b.context_length, b.context_limit = 60, "the KV cache (60 tokens at --kv-dtype auto)"
    s, out = session(b)
    s.settings.max_tokens = 8
    for i in range(12):
        s.handle(f"question {i} of a long chat here")
    assert "outgrew the 60-token context, limited by the KV cache (60 tokens" in out.getvalue()
    s, out = session(EchoBackend())  # no context_limit: the model's context, said as before
    s.banner()
    assert "limited by" not in out.getvalue()
