"""Text in and out of generation: messages -> prompt ids, and a token stream -> the reply's text pieces.

One implementation for `llm run`, `llm chat`, bench's speculation and anything else that talks to the engine
in text.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

from llmcli.engine.llm_engine import GenerationStats, StreamEvent
from llmcli.errors import UserError
from llmcli.tokenizer import Tokenizer
from llmcli.tokenizer.stream import StreamDecoder


def valid_text(s: str) -> str:
    """Any str as valid Unicode text (encodable as UTF-8): the one place undecodable input is handled.

    Python turns bytes that are not UTF-8 (in argv, or stdin/files read with errors="surrogateescape") into lone
    surrogates U+DC80..U+DCFF. Those are turned back into their bytes and the bytes decoded as UTF-8, so an escaped
    sequence that is valid UTF-8 after all (argv decoded under a C/ASCII locale) becomes its real characters, and
    what is not UTF-8 becomes U+FFFD, one per bad byte as Python's "replace" does. Any other lone surrogate
    (U+D800..U+DFFF, e.g. from a JSON escape) becomes U+FFFD too. Valid text is returned as it is.
    """
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(o - 0xDC00)  # a byte that surrogateescape could not decode
        elif 0xD800 <= o <= 0xDFFF:
            out += "\ufffd".encode()
        else:
            out += ch.encode()
    return out.decode("utf-8", errors="replace")


def valid_messages(messages: list[dict]) -> list[dict]:
    """The messages with every str field made valid text (valid_text); other fields as they are."""
    return [{k: valid_text(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]


def text_ids(tokenizer: Tokenizer | None, text: str) -> list[int]:
    """The text's own token ids (no chat template), undecodable input replaced first (valid_text)."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer")
    return list(tokenizer.encode(valid_text(text)))


def prompt_ids(tokenizer: Tokenizer | None, messages: list[dict]) -> list[int]:
    """The prompt of a conversation through the model's chat template, ending where the assistant's reply starts.

    The messages' text is made valid first (valid_text), so the tokenizer never sees an undecodable str."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer")
    messages = valid_messages(messages)
    if hasattr(tokenizer, "encode_chat"):
        return list(tokenizer.encode_chat(messages))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


class TextStream:
    """Turns generated token events into the reply's text as it grows.

    End-of-sequence tokens are not part of the reply (unless keep_eos: `--ignore-eos` generates past them), and
    characters that span several tokens are held back until complete. After (or during) `pieces`, `token_ids` are
    the reply's ids and `stats` the stats of the last event seen.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Collection[int], keep_eos: bool = False):
        self.decoder = StreamDecoder(tokenizer)
        self.eos_token_ids, self.keep_eos = eos_token_ids, keep_eos
        self.token_ids: list[int] = []
        self.stats: GenerationStats | None = None

    def pieces(self, events: Iterable[StreamEvent]) -> Iterator[str]:
        """The new text of each event (empty pieces are skipped), then whatever the decoder held back."""
        for ev in events:
            self.stats = ev.stats
            if ev.token_id in self.eos_token_ids and not self.keep_eos:
                continue  # the end-of-turn marker is not part of the reply
            self.token_ids.append(ev.token_id)
            piece = self.decoder.push(ev.token_id)
            if piece:
                yield piece
        tail = self.decoder.flush()
        if tail:
            yield tail
