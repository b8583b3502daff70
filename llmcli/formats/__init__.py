"""File formats: safetensors and GGUF reading."""

from __future__ import annotations

from pathlib import Path


def is_gguf(path: str | Path) -> bool:
    """True if path names a GGUF file (by its .gguf suffix): the one place that test is written."""
    return Path(path).suffix == ".gguf"
