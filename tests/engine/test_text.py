"""Text in: valid_text (undecodable input -> U+FFFD) and the prompt paths that use it."""

from __future__ import annotations

import random

import pytest

from llmcli.engine.text import prompt_ids, text_ids, valid_messages, valid_text


def _random_bytes(rng: random.Random) -> bytes:
    """Mostly UTF-8 text with stray bytes, truncated sequences and surrogate encodings mixed in."""
    pieces = [b"a", b"\xff", b"\xc3\xa9", b"\xc3", b"\xe2\x82\xac", b"\xe2\x82", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80"]
    pieces += [b"\x80", b"\n", b"\x00", b"\xfe\xff", b"\xf4\x90\x80\x80"]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


def test_surrogate_escaped_bytes_decode_as_python_replace_does():
    """Reference: bytes -> surrogateescape str -> valid_text equals bytes.decode('utf-8', 'replace')."""
    rng = random.Random(0)
    for _ in range(3000):
        raw = _random_bytes(rng)
        escaped = raw.decode("utf-8", errors="surrogateescape")
        out = valid_text(escaped)
        assert out == raw.decode("utf-8", errors="replace"), raw
        out.encode("utf-8")  # strict: valid text


def test_escaped_valid_utf8_becomes_its_characters():
    """argv decoded as ASCII (C locale) escapes every non-ASCII byte; valid UTF-8 among them is restored."""
    raw = "café €".encode()
    assert valid_text(raw.decode("ascii", errors="surrogateescape")) == "café €"


@pytest.mark.parametrize(
    ("s", "want"),
    [
        ("plain", "plain"),
        ("", ""),
        ("a\ud800b", "a\ufffdb"),  # a lone high surrogate (a JSON "\ud800" escape)
        ("\udfff", "\ufffd"),
        ("x\udcffy", "x\ufffdy"),
        ("\U0001f600", "\U0001f600"),
    ],
)
def test_lone_surrogates_are_replaced(s, want):
    assert valid_text(s) == want


def test_valid_text_is_returned_as_is():
    s = "héllo\n\x00wörld ☃"
    assert valid_text(s) is s


def test_valid_messages_leave_other_fields():
    msgs = [{"role": "user", "content": "a\udcffb", "n": 3}]
    assert valid_messages(msgs) == [{"role": "user", "content": "a\ufffdb", "n": 3}]
    assert msgs[0]["content"] == "a\udcffb"  # the caller's list is not changed


def test_tokenizer_paths_take_undecodable_text(smollm2_gguf):
    """The raw tokenizer refuses a str with surrogates (TypeError); prompt_ids and text_ids do not."""
    from llmcli.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    with pytest.raises(TypeError):
        tok.encode("a\udcffb")  # what the commands used to hit
    assert text_ids(tok, "a\udcffb") == tok.encode("a\ufffdb")
    bad = [{"role": "system", "content": "s\ud800"}, {"role": "user", "content": "a\udcffb"}]
    good = [{"role": "system", "content": "s\ufffd"}, {"role": "user", "content": "a\ufffdb"}]
    assert prompt_ids(tok, bad) == prompt_ids(tok, good)
