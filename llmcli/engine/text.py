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


def prompt_ids(tokenizer: Tokenizer | None, messages: list[dict]) -> list[int]:
    """The prompt of a conversation through the model's chat template, ending where the assistant's reply starts."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer")
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
