"""Where llmcli keeps its own files (quantized models, the default model, chat history)."""

from __future__ import annotations

import os
from pathlib import Path


def llmcli_home() -> Path:
    """$LLMCLI_HOME, else $XDG_CACHE_HOME/llmcli, else ~/.cache/llmcli."""
    if os.environ.get("LLMCLI_HOME"):
        return Path(os.environ["LLMCLI_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcli"


def store_dir() -> Path:
    """Models written by `llm quantize` live here, one directory each."""
    return llmcli_home() / "models"
