"""Safetensors checkpoints: the weight files of a model directory, their tensors one at a time, a file's header."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmcli.errors import UserError


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files, from model.safetensors.index.json when sharded, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in {directory}")
    return files


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the directory, memory-mapped, one at a time."""
    for f in safetensors_files(directory):
        if not f.is_file():
            raise UserError(f"missing weight shard {f.name} in {directory}")
        with safe_open(f, framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))
