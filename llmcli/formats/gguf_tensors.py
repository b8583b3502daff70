"""GGUF tensors under Hugging Face names: name mapping, llama.cpp's layout undone, raw and dequantized.

What differs from a safetensors checkpoint and is undone here:
  * names: blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, etc. (hf_tensor_name);
  * llama.cpp's convert script permutes the rows of Q and K for the `llama` architecture (it wants
    interleaved rotary pairs, HF rotates halves): PERMUTED_QK, with permute_qk_rows (HF -> ggml, for the
    writer) and its inverse unpermute_qk_rows. Quantized blocks never straddle rows, so the same
    permutation works on raw blocks too;
  * gemma stores its norm weights as (1 + w); HF stores w;
  * MoE experts are stored stacked ([experts, out, in]); they are yielded per expert like hub checkpoints.

  iter_gguf_raw(path) / gguf_raw_tensor(path, hf_name) -> RawTensor: the still-quantized blocks
  iter_gguf_tensors(path, dtype)                     -> (hf_name, dequantized tensor), one at a time
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmcli.errors import UserError
from llmcli.formats.gguf_config import gguf_to_hf_config
from llmcli.formats.gguf_reader import open_gguf_model

_GEMMA = ("gemma", "gemma2", "gemma3")
# llama.cpp only permutes Q/K rows when converting these architectures.
PERMUTED_QK = ("llama",)


# ---- tensor names -------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_norm_2": "input_layernorm",  # falcon-40b's attention norm (ln_attn); its attn_norm is ln_mlp
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
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "position_embd": "model.embed_positions",  # gpt2's learned positions
    "token_embd_norm": "model.embed_layernorm",  # bloom's norm after the embedding
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLK = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
# Tensors that only carry config data (read by load_gguf_config), not weights.
_CONFIG_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_tensor_name(gguf_name: str, family: str, names: Container[str] = ()) -> str | None:
    """The HF name of a (non-expert) GGUF tensor; None for tensors we do not map. names: every tensor name of the
    file (phi3 without ffn_gate keeps gate and up fused; falcon with attn_norm_2 has a norm each for attention and
    MLP, and attn_norm is the MLP's)."""
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
    if family == "falcon" and part == "attn_norm" and "blk.0.attn_norm_2.weight" in names:
        name = "post_attention_layernorm"
    if family == "phi3" and part == "ffn_up" and "blk.0.ffn_gate.weight" not in names:
        name = "mlp.gate_up_proj"  # phi3 keeps gate and up fused in one tensor
    if family == "mixtral" and part == "ffn_gate_inp":
        name = "block_sparse_moe.gate"
    return f"model.layers.{i}.{name}.{suffix}"


# ---- the llama Q/K row order ------------------------------------------------------------------------


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> ggml's interleaved rotary pairs, per head (llama.cpp's convert permute)."""
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk_rows: within each head, rows are stored as interleaved (even, odd)
    rotary pairs [x0, x_half, x1, x_half+1, ...]; HF wants the first half then the second half."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


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
        return gguf.GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block (34 for Q8_0: an f16 scale + 32 int8; 18 for Q4_0; 20 for Q4_1)."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]

    def dequantize(self) -> np.ndarray:
        return gguf.quants.dequantize(self.data, self.ggml_type).reshape(self.shape)


def iter_gguf_raw(path: str | Path) -> Iterator[RawTensor]:
    """Every weight of the file as a RawTensor under its HF name, in file order."""
    meta, infos = open_gguf_model(path)
    tensors = {t.name: t for t in infos}
    hf = gguf_to_hf_config(meta, tensors)
    family = hf["model_type"]
    arch = meta["general.architecture"]
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]

    for t in infos:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        data = t.data
        part = _BLK.match(t.name)
        part = part.group(2) if part else None
        if part in _EXPERTS:
            yield from _split_experts(t, shape, family, int(t.name.split(".")[1]))
            continue
        name = hf_tensor_name(t.name, family, tensors)
        if name is None:
            continue
        gtype = t.tensor_type
        if arch in PERMUTED_QK and part in ("attn_q", "attn_k") and t.name.endswith(".weight"):
            data = unpermute_qk_rows(data, heads if part == "attn_q" else kv_heads)
        elif arch in PERMUTED_QK and part in ("attn_q", "attn_k"):  # biases (rare) are permuted alike
            data = unpermute_qk_rows(data.reshape(-1, 1), heads if part == "attn_q" else kv_heads).reshape(-1)
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
    meta, infos = open_gguf_model(path)
    tensors = {t.name: t for t in infos}
    family = gguf_to_hf_config(meta, tensors)["model_type"]
    out = {}
    for t in infos:
        name = hf_tensor_name(t.name, family, tensors)
        if name is not None:
            out[name] = t.tensor_type
    return out


# ---- dequantized tensors --------------------------------------------------------------------------------


def dequantize_torch(data: np.ndarray, ggml_type, shape: tuple[int, ...]) -> torch.Tensor | None:
    """float32 torch tensor of `shape` from raw GGUF blocks, or None for types without a torch path.

    Same float32 operations in the same order as gguf.quants.dequantize (so results are bit-identical),
    but multi-threaded torch ops instead of single-threaded numpy: big models load several times faster.
    Block layouts are ggml's (ggml-common.h): every block starts or ends with its f16 scale(s).
    """
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


def iter_gguf_tensors(path: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight, dequantized to float32 then cast to dtype (default float32).

    One tensor is materialised at a time, so peak memory is the largest tensor, not the model.
    """
    dtype = dtype or torch.float32
    for raw in iter_gguf_raw(path):
        yield raw.name, dense_tensor(raw, path).to(dtype)


def dense_tensor(raw: RawTensor, path: str | Path) -> torch.Tensor:
    """raw dequantized to a float32 torch tensor (torch's threads where dequantize_torch has the type)."""
    t = dequantize_torch(raw.data, raw.ggml_type, raw.shape)
    if t is not None:
        return t
    try:
        w = raw.dequantize()
    except NotImplementedError:
        raise UserError(
            f"{path}: tensor {raw.name} uses GGML type {raw.ggml_type.name}, which cannot be dequantized"
        ) from None
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not w.flags.writeable:  # still a view of the read-only memory map (F32 tensors)
        w = w.copy()
    return torch.from_numpy(w)
