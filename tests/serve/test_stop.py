"""StopText against a reference that grows the reply one character at a time and stops at the first stop string."""

from __future__ import annotations

import random

import pytest

from llmcli.serve.stop import StopText


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Grow the text one character at a time; at the first length where a stop string is in it, cut before the
    earliest one."""
    for end in range(len(text) + 1):
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


def _run(pieces: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    st = StopText(stops)
    shown = []
    for p in pieces:
        shown.append(st.push(p))
        if st.stopped:
            break
    shown.append(st.flush())
    return shown, "".join(shown), st.stopped


@pytest.mark.parametrize("seed", range(200))
def test_random_pieces_match_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = []
    for _ in range(rng.randint(1, 3)):
        if text and rng.random() < 0.7:  # mostly stops that occur, some that do not
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 5)])
        else:
            stops.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    shown, out, stopped = _run(pieces, stops)
    assert (out, stopped) == _reference(text, stops)
    so_far = ""
    for s in shown:  # nothing shown is ever part of a stop string: every prefix shown is a prefix of the answer
        so_far += s
        assert out.startswith(so_far)


def test_a_stop_string_spanning_pieces_is_never_shown():
    shown, out, stopped = _run(["Hello", " wor", "ld", "!!"], ["world"])
    assert stopped and out == "Hello " and shown[:3] == ["Hello", " ", ""]


def test_a_held_back_prefix_that_is_no_stop_comes_out():
    shown, out, stopped = _run(["ab", "x"], ["abc"])
    assert not stopped and shown == ["", "abx", ""] and out == "abx"
