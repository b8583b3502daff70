"""StreamDecoder: generated token ids in, text deltas out (the incremental detokenizer)."""

from __future__ import annotations

from llmcli.tokenizer import Tokenizer


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get the new text for each.

    Decoding ids one by one is wrong twice over: a character can span several byte-level tokens (emoji,
    CJK), and SentencePiece decoders drop the leading space of the first token they see. So, like
    vLLM's incremental detokenizer, we decode a window that starts a few tokens back and emit only what
    the new tokens added; while the text ends in U+FFFD (an incomplete UTF-8 sequence) we hold back.
    The concatenation of all deltas plus flush() equals decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few tokens of already-emitted context
        self.read = 0  # ids before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if new_text.endswith("\ufffd") or not new_text.startswith(prefix_text):
            # Mid-character (or the window does not yet extend the emitted text): wait for more tokens.
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end (e.g. invalid UTF-8 that will never complete)."""
        if self.read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
        self.prefix, self.read = self.read, len(self.ids)
        return delta
