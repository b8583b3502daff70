"""`llm quantize --format gguf`: write a llama.cpp-compatible GGUF (Q8_0 / Q4_0 / Q4_1 / F16).

Output follows what llama.cpp's convert_hf_to_gguf.py writes, so llama.cpp, Ollama and transformers load it:
  * general.architecture llama (also Mistral), qwen2 or qwen3, and the <arch>.* hyperparameters;
  * tensor names token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, output_norm,
    output; for llama the rows of Q and K are permuted from HF's rotate-half order to ggml's interleaved
    rotary pairs (llmcli.formats.gguf_tensors, which undoes it when reading, holds both directions);
  * projection weights in the chosen type; token_embd/output in F16 (Q8_0 with --quantize-embeddings), norms
    and biases in F32, as llama.cpp does. A weight whose rows are not whole 32-value blocks stays F16;
  * tokenizer.ggml.* and tokenizer.chat_template: rebuilt from tokenizer.json for a model directory, copied
    unchanged from a GGUF source.

Quantization: Q8_0 and Q4_0 are gguf-py's reference quantizers (bit-identical to llama.cpp's). Q4_1 stores
w = d*q + m per 32 values with a float m, so with --method hqq the HQQ-optimised zero point (llmcli.quant.hqq)
becomes m = -zero*d and the blocks are packed here; with rtn it is gguf-py's min/max Q4_1. Q4_0 is symmetric
(no offset to optimise), so it is always round-to-nearest.

Tensors are read from the source one at a time and their encoded bytes go to GGUFWriter's spool file (on
disk past 256 MiB), so memory holds one tensor, not the model. The file is written to a temporary sibling
(llmcli.paths.temp_path, which a later run removes if this one is killed) and renamed onto the destination only
once complete; its mode is the umask's (0666 & ~umask), as any file the user creates.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer as Backend

from llmcli.config import ModelConfig, from_hf_dict
from llmcli.errors import UserError
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import llama3_factors
from llmcli.formats.gguf_reader import gguf_metadata, open_gguf, read_f32
from llmcli.formats.gguf_tensors import PERMUTED_QK, permute_qk_rows
from llmcli.paths import give_umask_modes, remove_path, temp_path
from llmcli.quant import QuantSpec
from llmcli.quant.checkpoint import LayerRecord, Summary, check_output, open_source
from llmcli.quant.hqq import quantize_int4_hqq
from llmcli.tokenizer.gguf_vocab import PRE_TOKENIZERS, gguf_bpe

BLOCK = 32  # values per Q8_0/Q4_0/Q4_1 block (also the int4 group size here)
GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "f16")
# HF model_type -> llama.cpp general.architecture (llama.cpp converts Mistral as llama).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIP = ("rotary_emb.inv_freq",)


def ggml_type(name: str):
    return gguf.GGMLQuantizationType[name.upper()]


def default_gguf_type(bits: int) -> str:
    return "q8_0" if bits == 8 else "q4_1"


def check_gguf_type(gguf_type: str | None, spec: QuantSpec) -> str:
    """The GGUF type to write for these options (UserError on a contradiction)."""
    if spec.method not in ("rtn", "hqq"):
        raise UserError(f"--format gguf supports --method rtn or hqq, not {spec.method}")
    t = (gguf_type or default_gguf_type(spec.bits)).lower()
    if t not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if t != "f16" and (8 if t == "q8_0" else 4) != spec.bits:
        raise UserError(f"--gguf-type {t} holds {8 if t == 'q8_0' else 4}-bit weights; --bits is {spec.bits}")
    return t


# ---- names and layouts -----------------------------------------------------------------------------------------


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor; None for tensors the GGUF does not store (rotary caches)."""
    if hf_name.endswith(_SKIP):
        return None
    base, _, suffix = hf_name.rpartition(".")
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    m = _LAYER_NAME.match(hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise UserError(f"tensor {hf_name} has no GGUF name in this writer (supported: dense {', '.join(ARCHITECTURES)})")


def wanted_type(gname: str, ndim: int, weight_type: str, quantize_embeddings: bool):
    """GGML type a tensor should get: norms/biases F32, embeddings F16 unless asked, weights the chosen type."""
    T = gguf.GGMLQuantizationType
    if ndim < 2:
        return T.F32
    if gname.startswith(("token_embd.", "output.")):
        return T.Q8_0 if quantize_embeddings else T.F16
    return ggml_type(weight_type)


def tensor_type(gname: str, shape: tuple[int, ...], weight_type: str, quantize_embeddings: bool):
    """The type written: the wanted one, or F16 when a row is not whole 32-value blocks (as llama.cpp does)."""
    wanted = wanted_type(gname, len(shape), weight_type, quantize_embeddings)
    quantized = wanted not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    return gguf.GGMLQuantizationType.F16 if quantized and shape[-1] % BLOCK else wanted


# ---- quantization --------------------------------------------------------------------------------------------


def quantize_q4_1_hqq(w: torch.Tensor) -> np.ndarray:
    """w [rows, k] -> Q4_1 blocks uint8 [rows, k // 32 * 20] with HQQ-optimised offsets.

    HQQ gives w ~= (q - z) * s; Q4_1 stores w ~= d * q + m, so d = s and m = -z * s, both f16. q is then
    re-rounded against the stored f16 d and m, so it is the nearest level of the grid the file really holds.
    """
    rows, k = w.shape
    _, scales, zeros = quantize_int4_hqq(w, BLOCK)
    d = scales.float()
    wg = w.float().reshape(rows, k // BLOCK, BLOCK)
    # A constant block has a scale below f16's range (d = 0): its offset alone must carry the value.
    m = torch.where(d != 0, -zeros.float() * d, wg.amin(dim=-1)).half().float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))  # ggml rounds (x - m) * (1/d)
    q = torch.round((wg - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).numpy()  # byte j: value j low nibble, value j + 16 high nibble
    dm = torch.stack([d.half(), m.half()], dim=-1).numpy().view(np.uint8).reshape(rows, k // BLOCK, 4)
    return np.concatenate([dm, qs], axis=-1).reshape(rows, k // BLOCK * 20)


def encode_tensor(w: torch.Tensor, qtype, method: str) -> np.ndarray:
    """One tensor as the bytes (or float array) GGUFWriter stores for qtype."""
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return w.float().numpy()
    if qtype == T.F16:
        return w.to(torch.float16).numpy()
    if qtype == T.Q4_1 and method == "hqq":
        return quantize_q4_1_hqq(w.float().reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1)
    return gguf.quants.quantize(w.float().numpy(), qtype)


# ---- metadata --------------------------------------------------------------------------------------------------


def add_hparams(writer, config: ModelConfig, arch: str, file_type: int, name: str) -> list[str]:
    """general.* and <arch>.* keys as convert_hf_to_gguf writes them; returns notes on what was dropped."""
    notes = []
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(int(config.head_dim * config.partial_rotary_factor))
    writer.add_vocab_size(config.vocab_size)
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        orig = rs.get("original_max_position_embeddings") or config.original_max_position_embeddings
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    elif kind == "llama3" and arch != "llama":
        raise UserError(f"llama3 rope scaling cannot be written for GGUF architecture {arch}")
    elif kind not in (None, "default", "llama3"):
        raise UserError(f"rope scaling {kind!r} cannot be expressed in a llama.cpp GGUF")
    if any(t != "full_attention" for t in config.layer_types) and config.sliding_window:
        notes.append(
            f"llama.cpp's {arch} has no sliding window: the GGUF attends to the whole context, "
            f"not the last {config.sliding_window} tokens"
        )
    return notes


def llama3_rope_freqs(config: ModelConfig) -> np.ndarray:
    """llama.cpp stores llama3 rope scaling as rope_freqs.weight: the divisor of each rotary frequency."""
    rs = config.rope_scaling
    dim = int(config.head_dim * config.partial_rotary_factor)
    orig = rs.get("original_max_position_embeddings") or config.original_max_position_embeddings or 8192
    return llama3_factors(
        config.rope_theta,
        dim,
        float(rs["factor"]),
        float(rs.get("low_freq_factor", 1.0)),
        float(rs.get("high_freq_factor", 4.0)),
        int(orig),
    ).astype(np.float32)


def _source_rope_freqs(src: Path) -> np.ndarray:
    """A GGUF source's stored llama3 factors, copied as they are: the parameters llmcli.formats.gguf_config
    recovers from them reproduce them only approximately when few frequencies fall in the smooth band."""
    return read_f32(next(t for t in open_gguf(src).tensors if t.name == "rope_freqs.weight"))


def _add_value(writer, key: str, value: Any) -> None:
    """One copied metadata value with the GGUF type convert_hf_to_gguf gives that key."""
    if key == "tokenizer.ggml.precompiled_charsmap":
        writer.add_precompiled_charsmap(bytes(value))
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)  # element type from the values: str, int32, float32, bool
    else:
        raise UserError(f"cannot copy GGUF metadata {key} of type {type(value).__name__}")


def copy_gguf_tokenizer(writer, src: Path) -> None:
    meta = gguf_metadata(src)
    if "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{src} has no tokenizer metadata to copy")
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            _add_value(writer, key, value)


def hf_vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp token types from a byte-level BPE tokenizer.json.

    Special added tokens are CONTROL, other added tokens USER_DEFINED; ids the model has but the tokenizer
    lacks are filled with [PAD<id>] USER_DEFINED entries, as convert_hf_to_gguf does.
    """
    TT = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, TT.NORMAL) for t, i in tokenizer_json["model"]["vocab"].items()}
    for a in tokenizer_json.get("added_tokens", []):
        by_id[int(a["id"])] = (a["content"], TT.CONTROL if a.get("special") else TT.USER_DEFINED)
    n = max(by_id) + 1
    if n > vocab_size:
        raise UserError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        t, ty = by_id.get(i, (f"[PAD{i}]", TT.USER_DEFINED))
        tokens.append(t)
        types.append(int(ty))
    return tokens, types


# llama.cpp pre-tokenizer names we can write (each one llama.cpp and llmcli.tokenizer both know).
PRE_CANDIDATES = ("gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o", "tekken", "dbrx")
PROBE = (
    "Hello world! It's 2024-11-23, 3.14159 and 1234567 apples.\n\n  Indented\tcode() {x += 1;}\r\n"
    "Ünïcödé café naïve — 日本語のテキスト 😀 I'm, you're, WE'LL, they'd  double  spaces   "
)


def _pre_structure(tj: dict) -> tuple[str | None, bool, bool]:
    """(split regex or None, digits split one by one, ignore_merges) of a tokenizer.json: the same triple
    llmcli.tokenizer.gguf_vocab.PRE_TOKENIZERS gives per llama.cpp name."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = next((p["pattern"].get("Regex") for p in steps if p.get("type") == "Split"), None)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in steps)
    return regex, digits, bool(tj.get("model", {}).get("ignore_merges"))


def pick_pre(meta: dict, tj: dict, source_backend) -> str:
    """tokenizer.ggml.pre for the source tokenizer.

    llama.cpp's converter looks the name up by a hash of how a check text tokenizes. We rank the names by how
    many of (split regex, digit splitting, ignore_merges) they share with tokenizer.json, then take the first
    under which the GGUF tokenizer (as llmcli.tokenizer.gguf_vocab rebuilds it) gives the source's ids on a probe text.
    """
    have = _pre_structure(tj)
    ranked = sorted(PRE_CANDIDATES, key=lambda n: -sum(a == b for a, b in zip(PRE_TOKENIZERS[n], have)))
    want = source_backend.encode(PROBE, add_special_tokens=False).ids
    for pre in ranked:
        got = gguf_bpe({**meta, "tokenizer.ggml.pre": pre}).encode(PROBE, add_special_tokens=False).ids
        if got == want:
            return pre
    raise UserError(
        "the source tokenizer's pre-tokenizer matches none llama.cpp knows "
        f"({', '.join(PRE_CANDIDATES)}); cannot write a GGUF tokenizer for it"
    )


def add_hf_tokenizer(writer, src: Path, config: ModelConfig) -> None:
    """tokenizer.* metadata from tokenizer.json (+ tokenizer_config.json, chat template files)."""
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{src} has no tokenizer.json; a GGUF needs the tokenizer in its metadata")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or "merges" not in model:
        fallback = " with byte fallback" if model.get("byte_fallback") else ""
        raise UserError(
            "--format gguf supports byte-level BPE tokenizers (GPT-2 style); "
            f"{src.name}'s is {model.get('type')}{fallback}"
        )
    tokens, types = hf_vocab(tj, config.vocab_size)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))
    meta = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": special.merges,
    }
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pick_pre(meta, tj, Backend.from_file(str(tj_path))))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)  # merges, bos/eos/unk/pad ids, add_bos_token, chat template


# ---- the writer --------------------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    gname: str
    shape: tuple[int, ...]  # logical (HF order)
    data: np.ndarray
    qtype: Any
    quantized: bool
    fallback: bool  # a weight the chosen type could not hold (row not whole blocks): written F16


def _encoded_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: ModelConfig,
    arch: str,
    weight_type: str,
    spec: QuantSpec,
    summary: Summary,
) -> Iterator[_Encoded]:
    T = gguf.GGMLQuantizationType
    for name, w in tensors:
        gname = gguf_tensor_name(name)
        if gname is None:
            continue
        if gname == "output.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        summary.bytes_before += w.numel() * 2
        w = w.float()
        if arch in PERMUTED_QK and gname.split(".")[-2] in ("attn_q", "attn_k"):  # weights and biases alike
            n_head = config.num_heads if ".attn_q." in gname else config.num_kv_heads
            w = torch.from_numpy(permute_qk_rows(w.reshape(w.shape[0], -1).numpy(), n_head).reshape(w.shape))
        qtype = tensor_type(gname, tuple(w.shape), weight_type, spec.quantize_embeddings)
        fallback = qtype != wanted_type(gname, w.ndim, weight_type, spec.quantize_embeddings)
        data = encode_tensor(w, qtype, spec.method)
        yield _Encoded(gname, tuple(w.shape), data, qtype, qtype not in (T.F16, T.F32), fallback)


_FILE_TYPES = {
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}


def write_gguf(src: Path, out: Path, spec: QuantSpec, *, force: bool = False, gguf_type: str | None = None) -> Summary:
    """Quantize the model at src (directory or .gguf) into the GGUF file out."""
    t0 = time.perf_counter()
    spec.validate()
    weight_type = check_gguf_type(gguf_type, spec)
    check_output(src, out, force=force)
    cfg, tensors = open_source(src)
    config = from_hf_dict(cfg)
    arch = ARCHITECTURES.get(config.family)
    if arch is None:
        raise UserError(
            f"--format gguf cannot write model family {config.family!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    if config.is_moe or config.is_mla:
        raise UserError("--format gguf writes dense models only")
    file_type = _FILE_TYPES[weight_type]
    summary = Summary(spec=spec, output=out)
    tmp = temp_path(out)
    remove_path(tmp)  # only this process can own the name
    try:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
        name = re.sub(r"[.-](Q\d\w*|F16|F32|BF16)$", "", src.stem if is_gguf(src) else src.name, flags=re.I)
        summary.notes += add_hparams(writer, config, arch, int(file_type), name)
        if is_gguf(src):
            copy_gguf_tokenizer(writer, src)
        else:
            add_hf_tokenizer(writer, src, config)
        if arch == "llama" and (config.rope_scaling or {}).get("rope_type") == "llama3":
            writer.add_tensor(
                "rope_freqs.weight", _source_rope_freqs(src) if is_gguf(src) else llama3_rope_freqs(config)
            )
        fallback = []
        for e in _encoded_tensors(tensors(), config, arch, weight_type, spec, summary):
            writer.add_tensor(e.gname, e.data, raw_dtype=e.qtype)
            if e.fallback:
                fallback.append(e.gname)
            if e.quantized:
                summary.layers.append(LayerRecord(e.gname.removesuffix(".weight"), e.shape, BLOCK))
            else:
                summary.kept += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        give_umask_modes(tmp)
        os.replace(tmp, out)  # atomic: an existing output (--force) is replaced only now
    except BaseException:
        remove_path(tmp)
        raise
    summary.bytes_after = out.stat().st_size
    _add_notes(summary, spec, weight_type, fallback)
    summary.seconds = time.perf_counter() - t0
    return summary


def _add_notes(summary: Summary, spec: QuantSpec, weight_type: str, fallback: list[str]) -> None:
    """What was written (first), and where the options could not be followed (last)."""
    kind = weight_type.upper()
    if weight_type == "q4_1":
        kind += " with HQQ-optimised offsets" if spec.method == "hqq" else " (round to nearest, min/max)"
    elif weight_type == "q4_0" and spec.method == "hqq":
        kind += " (symmetric, no offset for HQQ to optimise: round to nearest)"
    summary.notes.insert(0, f"GGUF {kind}; embeddings {'Q8_0' if spec.quantize_embeddings else 'F16'}, norms F32")
    if spec.bits == 4 and weight_type != "f16" and spec.group_size != BLOCK:
        summary.notes.append(f"GGUF 4-bit blocks hold {BLOCK} weights: group size {BLOCK} used, not {spec.group_size}")
    if fallback:
        summary.notes.append(f"{len(fallback)} weights stay F16: their rows are not whole {BLOCK}-value blocks")
