"""Perplexity of a model on a text: exp(mean negative log-likelihood of each token given the ones before it).

The token stream is cut into consecutive windows of `window` tokens (no overlap); each window is a fresh
sequence and is scored on all but its first token, so the numbers match the usual "strided, stride =
window" evaluation of transformers on the same text. Only the first max_tokens tokens are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.errors import UserError

# The default evaluation text: English prose every Debian/Ubuntu machine ships (package base-files).
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored (each window's first token is context only)
    nll: float  # mean negative log-likelihood in nats

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "nll": self.nll}


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{p} is empty")
    return text


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[1:] under logits[:-1] (logits [n, V], ids [n])."""
    return F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="sum")


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int = 512, max_tokens: int | None = None) -> PerplexityResult:
    """Score token ids with an LLMEngine (anything with add / forward_logits(all_positions) / release)."""
    if window < 2:
        raise UserError("--window must be at least 2 tokens")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        seq = engine.add(chunk)
        try:
            seq.num_computed = 0  # score every position even if a cached prefix matched
            logits = engine.forward_logits([seq], all_positions=True)[0]
        finally:
            engine.release(seq)
        total += window_nll(logits, torch.tensor(chunk)).item()
        count += len(chunk) - 1
    if count == 0:
        raise UserError("the text has fewer than 2 tokens")
    nll = total / count
    return PerplexityResult(math.exp(nll), count, nll)
