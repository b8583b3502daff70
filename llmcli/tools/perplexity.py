"""Perplexity of a model on a text: exp(mean negative log-likelihood of each token given the ones before it).

The token stream is cut into consecutive windows of `window` tokens (no overlap); each window is a fresh
sequence and is scored on all but its first token, so the numbers match the usual "strided, stride =
window" evaluation of transformers on the same text. Only the first max_tokens tokens are used.
measure_perplexity does the whole job for a model path: tokenize, load the engine, score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.engine.tp import load_engine
from llmcli.errors import UserError
from llmcli.tokenizer import load_tokenizer

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


def encode_text(path: Path, text: str) -> list[int]:
    """Token ids of plain text (no special tokens added) with the model's own tokenizer."""
    return list(load_tokenizer(path).encode(text, add_special_tokens=False))


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[1:] under logits[:-1] (logits [n, V], ids [n])."""
    return F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="sum")


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int = 512, max_tokens: int | None = None) -> PerplexityResult:
    """Score token ids with an LLMEngine (anything with forward_window(ids, all_positions=True))."""
    if window < 2:
        raise UserError("--window must be at least 2 tokens")
    if window > engine.context_len:  # the model's context, or a smaller KV cache
        raise UserError(f"--window {window:,} is past the context of {engine.context_len:,} tokens")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = engine.forward_window(chunk, all_positions=True)  # every position, even a cached prefix
        total += window_nll(logits, torch.tensor(chunk)).item()
        count += len(chunk) - 1
    if count == 0:
        raise UserError("the text has fewer than 2 tokens")
    nll = total / count
    return PerplexityResult(math.exp(nll), count, nll)


def measure_perplexity(
    path: Path,
    text: str,
    window: int,
    max_tokens: int | None,
    device: str | None,
    dtype: str | None,
    dequantize: bool = False,
    tensor_parallel: int = 1,
    kv_dtype: str | None = None,
) -> PerplexityResult:
    """Perplexity of the model at path (resolved: a directory or a .gguf file) on text, its KV cache in kv_dtype."""
    ids = encode_text(path, text)
    kw = dict(tokenizer=False, dequantize=dequantize, kv_dtype=kv_dtype)
    engine = load_engine(path, tensor_parallel, device, dtype, **kw)
    return perplexity(engine, ids, window=window, max_tokens=max_tokens)
