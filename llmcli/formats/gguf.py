"""Reading GGUF files: the model config, and the weights under Hugging Face names.

Everything goes through `gguf.GGUFReader`, which memory-maps the file, so tensors are read lazily one at
a time. Three entry points:

  load_gguf_config(path)        -> ModelConfig (a HF-style dict is filled from the metadata and handed to
                                   llmcli.config.from_hf_dict: one normalisation path for every format)
  iter_gguf_tensors(path, dtype) -> (hf_name, dequantized tensor), one at a time
  iter_gguf_raw(path) / gguf_raw_tensor(path, hf_name)
                                -> RawTensor: the still-quantized blocks
  iter_gguf_kept(path, dtype, keep) -> like iter_gguf_tensors, but the weights in `keep` come out as our
                                   quantized modules' tensors (Q4_0/Q4_1 -> int4 group 32 with offsets,
                                   exact; Q8_0 -> int8 per row, requantized), which the loader keeps.

What differs from a safetensors checkpoint and is undone here:
  * names: blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, etc.
  * llama.cpp's convert script permutes the rows of Q and K for the `llama` architecture (it wants
    interleaved rotary pairs, HF rotates halves); we apply the inverse row permutation. Quantized blocks
    never straddle rows, so the same permutation works on raw blocks too.
  * gemma stores its norm weights as (1 + w); HF stores w.
  * MoE experts are stored stacked ([experts, out, in]); they are yielded per expert like hub checkpoints.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmcli.config import ModelConfig, from_hf_dict
from llmcli.errors import UserError

# GGUF general.architecture -> transformers model_type.
ARCH_TO_FAMILY = {
    "llama": "llama",  # also Mistral/Mixtral GGUFs, which llama.cpp writes as llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
_GEMMA = ("gemma", "gemma2", "gemma3")
# llama.cpp only permutes Q/K rows when converting these architectures.
_PERMUTED_QK = ("llama",)


# ---- opening and metadata -------------------------------------------------------------------------


# A small reader of our own: gguf.GGUFReader builds a numpy view per array element, which takes seconds
# for a 50k-token vocabulary (and that is on the `llm run` startup path). Here the header is parsed with
# struct into plain Python values and tensors are numpy views of one read-only memory map, laid out
# exactly as GGUFReader lays them out (so gguf.quants.dequantize accepts them).

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFField:
    """One metadata value; contents() mirrors gguf.ReaderField.contents()."""

    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class GGUFTensorInfo:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: innermost dimension first (as gguf.ReaderTensor.shape)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file
    data: np.ndarray  # rows-first view; uint8 blocks for quantized types and BF16


@dataclass
class GGUFFile:
    path: str
    version: int
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensorInfo]

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: f.value for k, f in self.fields.items()}


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise ValueError("the header runs past the end of the file (truncated download?)")
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > self.size:
            raise ValueError("a string runs past the end of the file (truncated download?)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("I"), self.scalar("Q")
            if count > self.size:  # every element takes at least a byte: garbage length
                raise ValueError(f"array of {count} elements in a {self.size}-byte file")
            if itype in _NUMPY:  # numeric arrays in one go
                dt = np.dtype(_NUMPY[itype]).newbyteorder("<")
                end = self.pos + count * dt.itemsize
                if end > self.size:
                    raise ValueError("an array runs past the end of the file (truncated download?)")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def _parse(path: str) -> GGUFFile:
    import mmap

    import gguf

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError("too short to be one")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    cur = _Cursor(mm, size)
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise ValueError("big-endian GGUF files are not supported")
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    if n_tensors > size or n_kv > size:
        raise ValueError("corrupt header counts")
    fields: dict[str, GGUFField] = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = GGUFField(cur.value(cur.scalar("I")))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.scalar("Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(fields["general.alignment"].value) if "general.alignment" in fields else 32
    data_start = -(-cur.pos // align) * align

    whole = np.frombuffer(mm, dtype=np.uint8)  # read-only view of the map; slices are zero-copy
    tensors = []
    for name, dims, type_id, offset in infos:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_el = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n_el // block * type_size
        start = data_start + offset
        if start + n_bytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
        np_dims = list(reversed(dims))
        raw = whole[start:start + n_bytes]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
                     gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
                     gguf.GGMLQuantizationType.I64):
            dt = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}[qtype.name]
            data = raw.view(dt).reshape(np_dims)
        else:  # quantized and BF16: rows of whole blocks, as bytes
            if np_dims[-1] % block:
                raise ValueError(f"tensor {name}: row of {np_dims[-1]} is not a whole number of {qtype.name} blocks")
            data = raw.reshape(*np_dims[:-1], np_dims[-1] // block * type_size)
        tensors.append(GGUFTensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n_el, n_bytes, start, data))
    return GGUFFile(path, version, fields, tensors)


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return _parse(path)  # cached per file version (mtime/size in the key)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed (cached) GGUF header + memory-mapped tensors; UserError if missing or not a valid GGUF."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no GGUF file at {p}")
    st = p.stat()
    try:
        return _reader(str(p.resolve()), st.st_mtime_ns, st.st_size)
    except Exception as e:  # struct.error, ValueError, KeyError... on garbage or truncated files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{p} is not a valid GGUF file: {msg}") from None


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_shards(path: str | Path) -> list[Path]:
    """All files of a model: [path], or every shard of a split GGUF (NAME-00001-of-0000N.gguf), in order.

    Any shard may be given; the first one holds the metadata.
    """
    p = Path(path)
    count = int(open_gguf(p).metadata.get("split.count", 1) or 1)
    if count <= 1:
        return [p]
    m = _SHARD_NAME.match(p.name)
    if not m or int(m["count"]) != count:
        raise UserError(f"{p} is one of {count} shards of a split GGUF, but its name does not follow "
                        "NAME-00001-of-0000N.gguf, so the other shards cannot be found")
    shards = [p.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise UserError(f"split GGUF {p.name} is missing shard(s): {', '.join(missing)}")
    return shards


def _open_model(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """(metadata of the first shard, tensors of every shard)."""
    shards = gguf_shards(path)
    files = [open_gguf(s) for s in shards]
    return files[0].metadata, [t for f in files for t in f.tensors]


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists); of the first shard if split."""
    return open_gguf(gguf_shards(path)[0]).metadata


# ---- config -----------------------------------------------------------------------------------------


def load_gguf_config(path: str | Path) -> ModelConfig:
    meta, infos = _open_model(path)
    tensors = {t.name: t for t in infos}
    try:
        hf = gguf_to_hf_config(meta, tensors)
    except KeyError as e:
        raise UserError(f"{path} lacks the GGUF metadata key {e.args[0]!r}") from None
    return from_hf_dict(hf)


def gguf_to_hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A transformers-style config.json dict from GGUF metadata (+ the tensor table, for shapes and flags)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise UserError("GGUF file has no general.architecture")
    family = ARCH_TO_FAMILY.get(arch)
    if family is None:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCH_TO_FAMILY)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = get("attention.head_count_kv", heads)
    n_layers = int(meta[f"{arch}.block_count"])
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    if family == "phi3":  # phi3's rope.dimension_count is the rotary dim; the head is always hidden/heads
        head_dim = get("attention.key_length") or hidden // heads

    embd = tensors.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    # The embedding's row count is what the weights really have; the token list is a fallback.
    vocab = int(embd.shape[-1]) if embd is not None else (get("vocab_size") or len(tokens or ()))

    hf: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads)),
        "head_dim": int(head_dim),
        "intermediate_size": _ffn_length(get("feed_forward_length"), tensors),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
    }
    rotary = get("rope.dimension_count")
    if rotary and rotary != hf["head_dim"]:
        hf["partial_rotary_factor"] = rotary / hf["head_dim"]
    scaling = _rope_scaling(meta, arch, tensors, hf)
    if scaling:
        hf["rope_scaling"] = scaling
        if scaling.get("original_max_position_embeddings"):
            hf["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]

    window = get("attention.sliding_window")
    if family == "qwen2":
        hf["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if family == "llama" and "blk.0.attn_q.bias" in tensors:
        hf["attention_bias"] = True
    if family in ("gemma2", "gemma3_text"):
        hf["sliding_window"] = int(window or 4096)
        hf["attn_logit_softcapping"] = get("attn_logit_softcapping")
        hf["final_logit_softcapping"] = get("final_logit_softcapping")
        # llama.cpp hard-codes the query scale: hidden/heads for the 27B models, head_dim otherwise.
        is_27b = (family == "gemma2" and n_layers == 46) or (family == "gemma3_text" and n_layers == 62)
        hf["query_pre_attn_scalar"] = hidden // heads if is_27b else hf["head_dim"]
        if get("attention.scale"):  # newer converters may write the scale explicitly
            hf["query_pre_attn_scalar"] = float(get("attention.scale")) ** -2
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if family == "gemma":
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if family == "gemma3_text":
        # Older converters wrote neither key: llama.cpp then assumes every 6th layer global, local base 1e4.
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one bool per layer, True = sliding
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            hf["sliding_window_pattern"] = int(pattern)
        hf["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    if family == "phi3" and window:
        hf["sliding_window"] = int(window)
    if family == "llama" and get("expert_count"):
        hf["model_type"] = "mixtral"
        hf["num_local_experts"] = int(get("expert_count"))
        hf["num_experts_per_tok"] = int(get("expert_used_count", 2))
    if family in ("qwen2_moe", "qwen3_moe"):
        hf["num_experts"] = int(get("expert_count", 0))
        hf["num_experts_per_tok"] = int(get("expert_used_count", 1))
        hf["moe_intermediate_size"] = int(get("expert_feed_forward_length") or _expert_ffn(tensors))
        hf["norm_topk_prob"] = family == "qwen3_moe"
        if family == "qwen2_moe":
            shared = get("expert_shared_feed_forward_length")
            if shared is None and "blk.0.ffn_up_shexp.weight" in tensors:
                shared = tensors["blk.0.ffn_up_shexp.weight"].shape[-1]
            hf["shared_expert_intermediate_size"] = int(shared or 0)
    return hf


def _ffn_length(value: Any, tensors: dict[str, Any]) -> int:
    if isinstance(value, list):  # some converters write one value per layer
        value = max(value)
    if value:
        return int(value)
    t = tensors.get("blk.0.ffn_up.weight")
    return int(t.shape[-1]) if t is not None else 0


def _expert_ffn(tensors: dict[str, Any]) -> int:
    t = tensors.get("blk.0.ffn_up_exps.weight")
    return int(t.shape[1]) if t is not None else 0  # GGUF shapes are [in, out, experts]


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """Every end-of-generation id the file names: eos, and llama3-style eot/eom."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any], hf: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in tensors:  # phi3 longrope: the per-frequency factors are tensors
        return {
            "rope_type": "longrope",
            "long_factor": _read_f32(tensors["rope_factors_long.weight"]).tolist(),
            "short_factor": _read_f32(tensors["rope_factors_short.weight"]).tolist(),
            "original_max_position_embeddings": int(orig or hf["max_position_embeddings"]),
        }
    if "rope_freqs.weight" in tensors and arch == "llama":  # llama3: only the resulting factors are stored
        return llama3_scaling_from_factors(_read_f32(tensors["rope_freqs.weight"]), hf["rope_theta"], hf["head_dim"])
    if kind in (None, "none") or factor in (None, 0, 1.0):
        return None
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(orig or hf["max_position_embeddings"])
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{gguf_key}") is not None:
                out[hf_key] = float(meta[f"{arch}.rope.scaling.{gguf_key}"])
    return out


def _read_f32(t) -> np.ndarray:
    from gguf import dequantize

    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)


LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors of llama3 rope scaling (the closed form HF and llama.cpp share)."""
    inv_freq = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    f = 1.0 / ((1 - smooth) / factor + smooth)
    f = np.where(wavelen < orig / high, 1.0, f)
    return np.where(wavelen > orig / low, factor, f)


def llama3_scaling_from_factors(f: np.ndarray, theta: float, dim: int) -> dict | None:
    """Recover llama3 rope_scaling parameters from llama.cpp's stored rope_freqs tensor.

    In the smooth band 1/f = (1-s)/factor + s with s linear in 1/wavelen; a line fit gives the slope and
    intercept, i.e. orig/(high-low) and -low/(high-low). Only the ratios orig/low and orig/high matter, so
    we fix orig at Llama 3's 8192 and solve for low/high (Llama 3.x comes out as exactly 1 and 4).
    """
    f = np.asarray(f, dtype=np.float64)
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return None
    orig = LLAMA3_ORIGINAL_CONTEXT
    inv_freq = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    x = inv_freq / (2 * math.pi)  # 1 / wavelen
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))  # float32 noise must not count as the smooth band
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(x[mid], s, 1)
        low, high = -b * orig / a, (1 - b) * orig / a
    else:  # no smooth band to fit: place the band edges between the unscaled and the fully scaled ones
        lo_edge = x[f >= factor * (1 - 1e-4)].max()  # highest 1/wavelen fully scaled
        hi_edge = x[f <= 1 + 1e-4].min()
        low, high = lo_edge * orig * 1.0001, hi_edge * orig * 0.9999
    # Prefer Llama 3.x's own (1, 4), then round numbers, when they reproduce the stored (float32) factors.
    candidates = [(round(factor, 3), 1.0, 4.0)] + [(round(factor, d), round(low, d), round(high, d)) for d in (3, 6)]
    for fa, lo, hi in candidates:
        if hi > lo > 0 and np.allclose(llama3_factors(theta, dim, fa, lo, hi, orig), f, rtol=1e-5, atol=1e-6):
            factor, low, high = fa, lo, hi
            break
    return {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": orig}


# ---- tensor names -------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_MIXTRAL_EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
# Tensors that only carry config data (read by load_gguf_config), not weights.
_CONFIG_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_tensor_name(gguf_name: str, family: str, *, has_ffn_gate: bool = True) -> str | None:
    """The HF name of a (non-expert) GGUF tensor; None for tensors we do not map."""
    if gguf_name in _CONFIG_ONLY:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _BLK.match(gguf_name)
    if not m:
        return None
    i, part, suffix = m.groups()
    name = _LAYER_NAMES.get(part)
    if name is None:
        return None
    if family in ("gemma2", "gemma3_text") and part == "ffn_norm":
        name = "pre_feedforward_layernorm"  # gemma2/3 norm before the MLP; post_attention_norm is the other one
    if family == "phi3" and part == "ffn_up" and not has_ffn_gate:
        name = "mlp.gate_up_proj"  # phi3 keeps gate and up fused in one tensor
    if family == "mixtral" and part == "ffn_gate_inp":
        name = "block_sparse_moe.gate"
    return f"model.layers.{i}.{name}.{suffix}"


# ---- raw (still quantized) tensors ----------------------------------------------------------------


@dataclass
class RawTensor:
    """One GGUF tensor under its HF name, not dequantized.

    ggml_type: a gguf.GGMLQuantizationType (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...).
    shape:     the logical HF shape, torch order (out_features, in_features) for linear weights.
    data:      numpy array as stored, rows first: for quantized types uint8 of shape
               (*shape[:-1], shape[-1] // block_size * type_size), i.e. each row is a run of whole blocks
               (gguf.GGML_QUANT_SIZES[ggml_type] gives (block_size, type_size)); float types have the
               logical shape. Read-only memory map unless a row permutation made a copy.
    Q/K row permutation and the gemma norm offset are already undone, so dequantize(data) gives the HF
    weight exactly; `raw.dequantize()` does that.
    """

    name: str
    ggml_type: Any
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def block_size(self) -> int:
        """Values per block (32 for Q8_0/Q4_0/Q4_1, 256 for K-quants, 1 for float types)."""
        import gguf

        return gguf.GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block (34 for Q8_0: an f16 scale + 32 int8; 18 for Q4_0; 20 for Q4_1)."""
        import gguf

        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]

    def dequantize(self) -> np.ndarray:
        from gguf import dequantize

        return dequantize(self.data, self.ggml_type).reshape(self.shape)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(): within each head, rows are stored as interleaved (even, odd)
    rotary pairs [x0, x_half, x1, x_half+1, ...]; HF wants the first half then the second half."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def iter_gguf_raw(path: str | Path) -> Iterator[RawTensor]:
    """Every weight of the file as a RawTensor under its HF name, in file order."""
    import gguf

    meta, infos = _open_model(path)
    tensors = {t.name: t for t in infos}
    hf = gguf_to_hf_config(meta, tensors)
    family = hf["model_type"]
    arch = meta["general.architecture"]
    has_ffn_gate = "blk.0.ffn_gate.weight" in tensors
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]

    for t in infos:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        data = t.data
        part = _BLK.match(t.name)
        part = part.group(2) if part else None
        if part in _EXPERTS:
            yield from _split_experts(t, shape, family, int(t.name.split(".")[1]))
            continue
        name = hf_tensor_name(t.name, family, has_ffn_gate=has_ffn_gate)
        if name is None:
            continue
        gtype = t.tensor_type
        if arch in _PERMUTED_QK and part in ("attn_q", "attn_k") and t.name.endswith(".weight"):
            data = _unpermute_rows(data, heads if part == "attn_q" else kv_heads)
        elif arch in _PERMUTED_QK and part in ("attn_q", "attn_k"):  # biases (rare) are permuted alike
            data = _unpermute_rows(data.reshape(-1, 1), heads if part == "attn_q" else kv_heads).reshape(-1)
        if arch in _GEMMA and name.endswith("norm.weight"):
            data = gguf.dequantize(data, gtype).reshape(shape) - 1.0  # llama.cpp stores gemma's (1 + w)
            gtype = gguf.GGMLQuantizationType.F32
        if part == "ffn_gate_inp_shexp" and len(shape) == 1:
            shape = (1, shape[0])  # HF's shared_expert_gate is a Linear(hidden, 1)
            data = data.reshape(1, -1)  # one row, for float and quantized data alike
        yield RawTensor(name, gtype, shape, data)


def _split_experts(t, shape: tuple[int, ...], family: str, layer: int) -> Iterator[RawTensor]:
    part = t.name.split(".")[2]
    if family == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        proj = _MIXTRAL_EXPERTS[part]
    else:
        prefix = f"model.layers.{layer}.mlp.experts"
        proj = _EXPERTS[part]
    for e in range(shape[0]):
        yield RawTensor(f"{prefix}.{e}.{proj}.weight", t.tensor_type, shape[1:], t.data[e])


def gguf_raw_tensor(path: str | Path, hf_name: str) -> RawTensor:
    """One tensor by its HF name, still quantized (see RawTensor)."""
    for raw in iter_gguf_raw(path):
        if raw.name == hf_name:
            return raw
    raise UserError(f"{path} has no tensor {hf_name}")


def gguf_tensor_types(path: str | Path) -> dict[str, Any]:
    """HF weight name -> GGML type of every non-expert tensor, from the header alone (no data is read).

    The loader uses it to decide, before allocating the model, which linears stay quantized."""
    meta, infos = _open_model(path)
    tensors = {t.name: t for t in infos}
    family = gguf_to_hf_config(meta, tensors)["model_type"]
    has_ffn_gate = "blk.0.ffn_gate.weight" in tensors
    out = {}
    for t in infos:
        name = hf_tensor_name(t.name, family, has_ffn_gate=has_ffn_gate)
        if name is not None:
            out[name] = t.tensor_type
    return out


# ---- kept-quantized tensors (Q4_0 / Q4_1 -> int4 group 32 with offsets, Q8_0 -> int8 per row) --------------

# The GGML types whose blocks map onto our kernels' layouts (llmcli.quant.linear): which module they load into.
KEEP_INT4 = ("Q4_0", "Q4_1")  # Int4OffsetLinear, group 32: exact
KEEP_INT8 = ("Q8_0",)  # Int8Linear, requantized per row (see requantize_q8_0 for why)
KEPT_GROUP_SIZE = 32


def _nibbles_to_pairs(qs: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """ggml's 16 bytes per block (element j low nibble, j + 16 high nibble) -> llmcli.quant.int4's packing
    (columns 2j, 2j + 1 in the low/high nibble of byte j)."""
    import torch

    from llmcli.quant.int4 import pack_int4

    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [..., 32] in element order
    return pack_int4(q)


def raw_to_int4(raw: RawTensor) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """A Q4_0/Q4_1 RawTensor [out, in] -> Int4OffsetLinear tensors: qweight uint8 [out, in/2],
    scales and offsets fp16 [out, in/32], with w = q * scale + offset exactly as ggml dequantizes."""
    import warnings

    import torch

    out, k = raw.shape
    n_groups = k // KEPT_GROUP_SIZE
    with warnings.catch_warnings():  # read-only memory map; nothing here writes to it
        warnings.simplefilter("ignore")
        b = torch.from_numpy(raw.data).reshape(out, n_groups, raw.type_size)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    if raw.ggml_type.name == "Q4_1":  # d, m, 16 bytes: w = d * q + m
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        qs = b[..., 4:]
    else:  # Q4_0: d, 16 bytes: w = d * (q - 8) = d * q + (-8 d); -8d is exact in fp16 unless it overflows
        m = (d.float() * -8.0).to(torch.float16)
        if not torch.isfinite(m).all():
            raise UserError(f"{raw.name}: Q4_0 scale too large to keep quantized (load with --dequantize)")
        qs = b[..., 2:]
    qweight = _nibbles_to_pairs(qs).reshape(out, k // 2)
    return {"qweight": qweight, "scales": d.clone(), "offsets": m.clone()}


def requantize_q8_0(raw: RawTensor) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """A Q8_0 RawTensor [out, in] -> Int8Linear tensors (qweight int8 [out, in], scales fp16 [out]).

    Q8_0 has one scale per 32 values; the fast CPU kernel (aten._weight_int8pack_mm) takes one per row.
    Measured on this 2-core CPU at decode (one row, SmolLM2 shapes): the per-row kernel takes 25-47 us per
    projection, an exact block-scaled dequantize-then-matmul 150-440 us, slower even than the fp32 matmul
    it would replace (64-99 us). So the row is requantized: the extra error is at most half a row step
    (row max / 254) per weight, ~0.7% relative (Frobenius) on Gaussian weights, on top of Q8_0's own.
    """
    from llmcli.quant.int8 import quantize_int8

    w = dequantize_torch(raw.data, raw.ggml_type, raw.shape)
    q, scales = quantize_int8(w)
    return {"qweight": q, "scales": scales}


# ---- dequantized tensors --------------------------------------------------------------------------------


def dequantize_torch(data: np.ndarray, ggml_type, shape: tuple[int, ...]) -> "torch.Tensor | None":  # noqa: F821
    """float32 torch tensor of `shape` from raw GGUF blocks, or None for types without a torch path.

    Same float32 operations in the same order as gguf.quants.dequantize (so results are bit-identical),
    but multi-threaded torch ops instead of single-threaded numpy: big models load several times faster.
    Block layouts are ggml's (ggml-common.h): every block starts or ends with its f16 scale(s).
    """
    import warnings

    import gguf
    import torch

    T = gguf.GGMLQuantizationType
    if ggml_type not in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K):
        return None
    type_size = gguf.GGML_QUANT_SIZES[ggml_type][1]
    with warnings.catch_warnings():  # the memory map is read-only and we only read it
        warnings.simplefilter("ignore")
        b = torch.from_numpy(data).reshape(-1, type_size)
    n = b.shape[0]

    def f16(cols: torch.Tensor) -> torch.Tensor:
        return cols.contiguous().view(torch.float16).float()

    def nibbles(qs: torch.Tensor) -> torch.Tensor:  # low nibbles first, then high ones, per group
        return torch.stack([qs & 0x0F, qs >> 4], dim=-2)

    if ggml_type == T.Q8_0:  # d, 32 x int8
        y = b[:, 2:].view(torch.int8).float() * f16(b[:, :2])
    elif ggml_type == T.Q4_0:  # d, 16 bytes of 4-bit values offset by 8
        q = nibbles(b[:, 2:]).reshape(n, 32).to(torch.int8) - 8
        y = f16(b[:, :2]) * q.float()
    elif ggml_type == T.Q4_1:  # d, m, 16 bytes of 4-bit values
        y = f16(b[:, :2]) * nibbles(b[:, 4:]).reshape(n, 32).float() + f16(b[:, 2:4])
    elif ggml_type == T.Q4_K:  # d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks, 128 bytes of nibbles
        d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
        sc_d, sc_m, sc_md = b[:, 4:16].reshape(n, 3, 4).unbind(1)
        sc = torch.cat([sc_d & 0x3F, (sc_md & 0x0F) | ((sc_d >> 2) & 0x30)], dim=-1)
        mn = torch.cat([sc_m & 0x3F, (sc_md >> 4) | ((sc_m >> 2) & 0x30)], dim=-1)
        q = nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
        y = (d * sc.float()).reshape(n, 8, 1) * q - (dmin * mn.float()).reshape(n, 8, 1)
    else:  # Q6_K: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d
        ql = nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
        qh_bytes = b[:, 128:192].reshape(n, 2, 1, 32)
        qh = torch.cat([(qh_bytes >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        d = f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()
        y = d.reshape(n, 16, 1) * q
    return y.reshape(shape)


def iter_gguf_tensors(path: str | Path, dtype=None) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """(HF name, tensor) for every weight, dequantized to float32 then cast to dtype (default float32).

    One tensor is materialised at a time, so peak memory is the largest tensor, not the model.
    """
    return iter_gguf_kept(path, dtype, {})


def iter_gguf_kept(path: str | Path, dtype=None,
                   keep: dict[str, str] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """Like iter_gguf_tensors, but the weights named in keep (HF name -> "int4" | "int8") come out as the
    quantized module's tensors instead: NAME.qweight / .scales / .offsets (raw_to_int4) or NAME.qweight /
    .scales (requantize_q8_0), NAME being the weight's name without `.weight`."""
    import torch

    dtype = dtype or torch.float32
    keep = keep or {}
    for raw in iter_gguf_raw(path):
        kind = keep.get(raw.name)
        if kind is not None:
            base = raw.name.removesuffix(".weight")
            parts = raw_to_int4(raw) if kind == "int4" else requantize_q8_0(raw)
            for suffix, t in parts.items():
                yield f"{base}.{suffix}", t
            continue
        yield raw.name, _dense(raw, path).to(dtype)


def _dense(raw: RawTensor, path: str | Path) -> "torch.Tensor":  # noqa: F821
    import torch

    t = dequantize_torch(raw.data, raw.ggml_type, raw.shape)
    if t is not None:
        return t
    try:
        w = raw.dequantize()
    except NotImplementedError:
        raise UserError(f"{path}: tensor {raw.name} uses GGML type {raw.ggml_type.name}, which cannot be "
                        "dequantized") from None
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not w.flags.writeable:  # still a view of the read-only memory map (F32 tensors)
        w = w.copy()
    return torch.from_numpy(w)


def gguf_state_dict(path: str | Path, dtype=None) -> dict[str, "torch.Tensor"]:  # noqa: F821
    return dict(iter_gguf_tensors(path, dtype))


__all__ = [
    "ARCH_TO_FAMILY", "KEEP_INT4", "KEEP_INT8", "RawTensor", "gguf_metadata", "gguf_tensor_types", "iter_gguf_kept",
    "raw_to_int4", "requantize_q8_0", "gguf_shards", "gguf_raw_tensor", "gguf_state_dict", "gguf_to_hf_config",
    "dequantize_torch", "hf_tensor_name", "iter_gguf_raw", "iter_gguf_tensors", "llama3_factors",
    "llama3_scaling_from_factors", "load_gguf_config", "open_gguf",
]
