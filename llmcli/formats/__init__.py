"""File formats: GGUF and safetensors reading, and `is_gguf`, the one test for a GGUF file.

gguf_reader (the binary reader), gguf_config (metadata -> config), gguf_tensors (tensor names, llama.cpp's
layouts undone, raw and dequantized tensors), safetensors (files, iteration, header).
"""

from __future__ import annotations

from pathlib import Path


def is_gguf(path: str | Path) -> bool:
    """True if path names a GGUF file (by its .gguf suffix): the one place that test is written."""
    return Path(path).suffix == ".gguf"
