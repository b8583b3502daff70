"""Safetensors checkpoints: the weight files of a model directory, their tensors one at a time, a file's header.

iter_safetensors yields every checkpoint under the llama-style names the engine's modules have: the families
whose checkpoints name and lay out tensors their own way (gpt2, gpt_neox, phi, bloom, mpt, falcon) are renamed as
they are read, by LEGACY_LAYOUTS, and their fused projections put in the engine's layout (gpt2's Conv1D weights are
stored [in, out]; gpt_neox, bloom and falcon interleave q/k/v per head or per key/value group; a fused q/k/v is
split into llama's q_proj/k_proj/v_proj). So the loader and the quantizing writers, which all read through
iter_safetensors, see one naming; a checkpoint already in these names (`llm quantize` output) passes as is.

Every reader here checks the file first (safetensors_header: the 8-byte header length, UTF-8 JSON, and each
tensor's dtype, shape and byte range against the data that is really there), so that a corrupt or truncated file
ends in one UserError naming the file and what is wrong with it, never in the safetensors library's own text.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from llmcli.config import from_hf_dict
from llmcli.errors import UserError

if TYPE_CHECKING:  # only for annotations: `llm list/show/estimate` read headers and must not pay torch's import
    import torch

INDEX = "model.safetensors.index.json"

# Bits per element of every dtype the format defines (safetensors' Dtype enum).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


class CorruptFile(UserError):
    """A weight file or index that cannot be what it claims: the message names the file and the fault."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}")
        self.path = path


def _corrupt(path: Path, what: str) -> CorruptFile:
    return CorruptFile(path, f"not a valid safetensors file: {what}")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON), checked against the file:
    CorruptFile unless every tensor has a known dtype, a shape whose size is its byte range, and the byte ranges
    tile the data after the header exactly (no overlap, gap or missing bytes), as safetensors requires."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _corrupt(path, "the file is empty (an interrupted download?)")
            if size < 8:
                raise _corrupt(path, f"the file is only {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise _corrupt(
                    path, f"the header length ({n:,} bytes) is larger than the rest of the file ({size - 8:,} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CorruptFile(path, f"cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"the header is not UTF-8 text (byte {e.start})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise _corrupt(path, f"the header is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {type(header).__name__}, not an object")
    _check_tensors(path, header, size - 8 - n)
    return header


def _check_tensors(path: Path, header: dict, data_len: int) -> None:
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(path, "__metadata__ is not a map of strings")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= t.keys():
            raise _corrupt(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise _corrupt(path, f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has a shape that is not a list of sizes: {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise _corrupt(path, f"tensor {name!r} has data_offsets that are not [begin, end]: {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise _corrupt(path, f"tensor {name!r} ends (byte {end:,}) before it begins (byte {begin:,})")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise _corrupt(
                path,
                f"tensor {name!r} of shape {shape} {dtype} needs {bits / 8:,g} bytes but its data_offsets "
                f"span {end - begin:,}",
            )
        spans.append((begin, end, name))
    spans.sort()
    ends = [end for _, end, _ in spans]
    tiled = all(b == e for (b, _, _), e in zip(spans[1:], ends)) and (not spans or spans[0][0] == 0)
    if tiled and spans and ends[-1] > data_len:
        raise _corrupt(
            path,
            f"the file is truncated: its tensors need {ends[-1]:,} bytes of data after the header, it has "
            f"{data_len:,} (an interrupted download?)",
        )
    for begin, end, name in spans:
        if end > data_len:
            raise _corrupt(
                path, f"tensor {name!r}'s data_offsets [{begin:,}, {end:,}] lie outside the {data_len:,} bytes of data"
            )
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise _corrupt(path, f"tensors {prev!r} and {name!r} overlap (bytes {begin:,} to {pos:,})")
        if begin > pos:
            raise _corrupt(path, f"{begin - pos:,} bytes before tensor {name!r} belong to no tensor")
        pos, prev = end, name
    if pos < data_len:
        raise _corrupt(path, f"{data_len - pos:,} bytes after the last tensor belong to no tensor")


@contextmanager
def open_safetensors(path: Path):
    """safe_open(path) on CPU in torch, after safetensors_header's checks; the library's errors name the file."""
    safetensors_header(path)
    try:
        st = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, " ".join(str(e).split())) from None
    try:
        with st:
            yield st
    except SafetensorError as e:  # get_tensor: e.g. a dtype torch cannot hold (F4, F6)
        raise _corrupt(path, " ".join(str(e).split())) from None


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files, from model.safetensors.index.json when sharded, else every *.safetensors.
    CorruptFile for an index that is not JSON, lacks weight_map or names shard files that are not there."""
    index = directory / INDEX
    if index.is_file():
        return _index_files(index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in {directory}")
    return files


def _index_files(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise CorruptFile(index, f"cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise CorruptFile(index, "not a valid weight index: it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CorruptFile(index, f"not a valid weight index: not JSON ({e.msg} at character {e.pos})") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CorruptFile(index, "not a valid weight index: it has no weight_map (tensor name -> shard file)")
    names = set(wmap.values())
    if not all(isinstance(v, str) and v and Path(v).name == v for v in names):
        raise CorruptFile(index, "not a valid weight index: its weight_map values are not shard file names")
    missing = sorted(n for n in names if not (index.parent / n).is_file())
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CorruptFile(index, f"names shard file(s) that are not there: {', '.join(missing[:3])}{more}")
    return [index.parent / n for n in sorted(names)]


# ---- checkpoints named their own way ---------------------------------------------------------------------------

# How a tensor is changed on the way: None as is, CONV1D transposed ([in, out] -> [out, in]), GROUPED q/k/v rows
# regrouped from [kv head][its q heads, k, v] to [q heads; k heads; v heads] (gpt_neox and bloom: one q head per
# group, i.e. [head][q, k, v]); DROP: not a weight (cached masks, rope tables).
CONV1D, GROUPED, DROP = "conv1d", "grouped", "drop"
_L = r"(?:transformer\.|gpt_neox\.)?"  # the model's wrapper, absent in some hub checkpoints (the original gpt2)
_LAYER = "model.layers.\\1."
# model_type -> (pattern, replacement, transform), first match wins
LEGACY_LAYOUTS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "gpt2": (
        (_L + r"wte\.", "model.embed_tokens.", None),
        (_L + r"wpe\.", "model.embed_positions.", None),
        (_L + r"ln_f\.", "model.norm.", None),
        (_L + r"h\.(\d+)\.ln_1\.", _LAYER + "input_layernorm.", None),
        (_L + r"h\.(\d+)\.ln_2\.", _LAYER + "post_attention_layernorm.", None),
        (_L + r"h\.(\d+)\.attn\.c_attn\.", _LAYER + "self_attn.qkv_proj.", CONV1D),
        (_L + r"h\.(\d+)\.attn\.c_proj\.", _LAYER + "self_attn.o_proj.", CONV1D),
        (_L + r"h\.(\d+)\.mlp\.c_fc\.", _LAYER + "mlp.up_proj.", CONV1D),
        (_L + r"h\.(\d+)\.mlp\.c_proj\.", _LAYER + "mlp.down_proj.", CONV1D),
        (_L + r"h\.(\d+)\.attn\.(masked_)?bias$", "", DROP),
    ),
    "gpt_neox": (
        (_L + r"embed_in\.", "model.embed_tokens.", None),
        (_L + r"final_layer_norm\.", "model.norm.", None),
        (r"embed_out\.", "lm_head.", None),
        (_L + r"layers\.(\d+)\.attention\.query_key_value\.", _LAYER + "self_attn.qkv_proj.", GROUPED),
        (_L + r"layers\.(\d+)\.attention\.dense\.", _LAYER + "self_attn.o_proj.", None),
        (_L + r"layers\.(\d+)\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)$", "", DROP),
        (_L + r"layers\.(\d+)\.mlp\.dense_h_to_4h\.", _LAYER + "mlp.up_proj.", None),
        (_L + r"layers\.(\d+)\.mlp\.dense_4h_to_h\.", _LAYER + "mlp.down_proj.", None),
        (_L + r"layers\.(\d+)\.", _LAYER, None),  # input_layernorm, post_attention_layernorm: same names
    ),
    "phi": (
        (r"model\.final_layernorm\.", "model.norm.", None),
        (r"model\.layers\.(\d+)\.self_attn\.dense\.", _LAYER + "self_attn.o_proj.", None),
        (r"model\.layers\.(\d+)\.mlp\.fc1\.", _LAYER + "mlp.up_proj.", None),
        (r"model\.layers\.(\d+)\.mlp\.fc2\.", _LAYER + "mlp.down_proj.", None),
    ),
    "bloom": (
        (_L + r"word_embeddings\.", "model.embed_tokens.", None),
        (_L + r"word_embeddings_layernorm\.", "model.embed_layernorm.", None),
        (_L + r"ln_f\.", "model.norm.", None),
        (_L + r"h\.(\d+)\.self_attention\.query_key_value\.", _LAYER + "self_attn.qkv_proj.", GROUPED),
        (_L + r"h\.(\d+)\.self_attention\.dense\.", _LAYER + "self_attn.o_proj.", None),
        (_L + r"h\.(\d+)\.mlp\.dense_h_to_4h\.", _LAYER + "mlp.up_proj.", None),
        (_L + r"h\.(\d+)\.mlp\.dense_4h_to_h\.", _LAYER + "mlp.down_proj.", None),
        (_L + r"h\.(\d+)\.", _LAYER, None),  # input_layernorm, post_attention_layernorm
    ),
    "falcon": (
        (_L + r"word_embeddings\.", "model.embed_tokens.", None),
        (_L + r"ln_f\.", "model.norm.", None),
        (_L + r"h\.(\d+)\.self_attention\.query_key_value\.", _LAYER + "self_attn.qkv_proj.", GROUPED),
        (_L + r"h\.(\d+)\.self_attention\.dense\.", _LAYER + "self_attn.o_proj.", None),
        (_L + r"h\.(\d+)\.mlp\.dense_h_to_4h\.", _LAYER + "mlp.up_proj.", None),
        (_L + r"h\.(\d+)\.mlp\.dense_4h_to_h\.", _LAYER + "mlp.down_proj.", None),
        (_L + r"h\.(\d+)\.ln_attn\.", _LAYER + "input_layernorm.", None),
        (_L + r"h\.(\d+)\.ln_mlp\.", _LAYER + "post_attention_layernorm.", None),
        (_L + r"h\.(\d+)\.", _LAYER, None),  # input_layernorm, post_attention_layernorm
    ),
    "mpt": (
        (_L + r"wte\.", "model.embed_tokens.", None),
        (_L + r"norm_f\.", "model.norm.", None),
        (_L + r"blocks\.(\d+)\.norm_1\.", _LAYER + "input_layernorm.", None),
        (_L + r"blocks\.(\d+)\.norm_2\.", _LAYER + "post_attention_layernorm.", None),
        (_L + r"blocks\.(\d+)\.attn\.Wqkv\.", _LAYER + "self_attn.qkv_proj.", None),
        (_L + r"blocks\.(\d+)\.attn\.out_proj\.", _LAYER + "self_attn.o_proj.", None),
        (_L + r"blocks\.(\d+)\.ffn\.", _LAYER + "mlp.", None),  # up_proj, down_proj: same names
    ),
}
_COMPILED = {f: tuple((re.compile("^" + p), r, t) for p, r, t in rules) for f, rules in LEGACY_LAYOUTS.items()}


class _Layout:
    """One directory's renaming (from its config.json's model_type; a plain pass-through for other families)."""

    def __init__(self, directory: Path):
        self.rules, self.heads, self.kv_heads = (), 0, 0
        try:
            cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # no readable config: the loader reports it; nothing to rename
        if isinstance(cfg, dict) and cfg.get("model_type") in _COMPILED:
            self.rules = _COMPILED[cfg["model_type"]]
            config = from_hf_dict(cfg)
            self.heads, self.kv_heads = config.num_heads, config.num_kv_heads

    def convert(self, name: str, get) -> list[tuple[str, torch.Tensor]]:
        """[(engine-style name, tensor in the engine's layout)]: a fused q/k/v comes out as q_proj, k_proj and
        v_proj, as llama checkpoints have them (so every quantizer's fused-shard handling applies); [] for a
        tensor that is not a weight."""
        for pattern, replacement, transform in self.rules:
            m = pattern.match(name)
            if m is None:
                continue
            if transform == DROP:
                return []
            new = m.expand(replacement) + name[m.end() :]
            t = get(name)
            if transform == CONV1D and t.dim() == 2:
                t = t.t()
            elif transform == GROUPED:
                t = self.ungroup(t)
            if ".self_attn.qkv_proj." not in new:
                return [(new, t.contiguous())]
            d = t.shape[0] // (self.heads + 2 * self.kv_heads)
            parts = t.split([self.heads * d, self.kv_heads * d, self.kv_heads * d])
            return [(new.replace(".qkv_proj.", f".{p}_proj."), x.contiguous()) for p, x in zip("qkv", parts)]
        return [(name, get(name))]

    def ungroup(self, t: torch.Tensor) -> torch.Tensor:
        """Rows [kv][g + 2][d] (g query heads, then k and v, per key/value head) -> [q (kv * g); k (kv); v (kv)]."""
        kv, g = self.kv_heads, self.heads // self.kv_heads
        d = t.shape[0] // (kv * (g + 2))
        heads = [(k, j) for k in range(kv) for j in range(g)] + [(k, j) for j in (g, g + 1) for k in range(kv)]
        return t[[(k * (g + 2) + j) * d + r for k, j in heads for r in range(d)]]


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the directory, memory-mapped, one at a time, under the engine's
    llama-style names (LEGACY_LAYOUTS)."""
    layout = _Layout(Path(directory))
    for f in safetensors_files(directory):
        with open_safetensors(f) as st:
            for name in st.keys():
                yield from layout.convert(name, st.get_tensor)
