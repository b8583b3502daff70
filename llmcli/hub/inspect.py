"""What a local model is, read without torch: format, file type, parameter count, config, `llm show` data."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import gguf

from llmcli.config import SUPPORTED_FAMILIES, ModelConfig, load_config
from llmcli.estimate import count_params
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.formats.gguf_reader import gguf_metadata, open_gguf
from llmcli.formats.safetensors import safetensors_header
from llmcli.hub.download import gguf_group

# llama.cpp quant names inside GGUF file names: Q4_K_M, IQ2_XXS, Q8_0, BF16, F16 ...
_QUANT_TAG = re.compile(r"(?i)(?<![a-z0-9])(i?q\d(?:_[a-z0-9]+)*|bf16|f16|f32)(?![a-z0-9])")


def _tensor_headers(d: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update({k: v for k, v in safetensors_header(p).items() if k != "__metadata__"})
    return out


def gguf_file_type(path: Path) -> str:
    """'GGUF Q4_1' etc., from general.file_type (falls back to the commonest tensor type)."""
    reader = open_gguf(path)
    f = reader.fields.get("general.file_type")
    if f is not None:
        try:
            name = gguf.LlamaFileType(int(f.contents())).name
            return "GGUF " + name.removeprefix("MOSTLY_").replace("ALL_", "")
        except (ValueError, TypeError):
            pass
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    return "GGUF " + kinds.most_common(1)[0][0] if kinds else "GGUF"


def gguf_stored_weights(path: Path) -> tuple[str, int, dict[str, int]]:
    """(weight type, bytes, tensors per ggml type) of a GGUF as stored: the type is general.file_type's (else the
    commonest tensor type) as --gguf-type names it ("q4_1"), the bytes are every tensor's as its header says."""
    reader = open_gguf(path)
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    label = gguf_file_type(path).removeprefix("GGUF").strip().lower() or "gguf"
    return label, int(sum(int(t.n_bytes) for t in reader.tensors)), dict(kinds.most_common())


def _gguf_params(path: Path) -> int:
    return int(sum(int(t.n_elements) for t in open_gguf(path).tensors))


def model_format(path: Path) -> str:
    """What `llm list` shows under FORMAT: 'GGUF Q4_1', 'int4 g64', 'nf4', 'safetensors bf16' ..."""
    if is_gguf(path):
        return gguf_file_type(path)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "llmcli":
        return f"int{q.get('bits')}" + (f" g{q['group_size']}" if q.get("group_size") else "")
    if q.get("quant_method") == "bitsandbytes":
        return "nf4" if q.get("bnb_4bit_quant_type", "nf4") == "nf4" and q.get("load_in_4bit", True) else "int8 (bnb)"
    if q.get("quant_method"):
        return str(q["quant_method"])
    dtypes = sorted({v["dtype"].lower().replace("float", "fp") for v in _tensor_headers(path).values()})
    names = {"bf16": "bf16", "f16": "fp16", "f32": "fp32", "fp16": "fp16", "fp32": "fp32"}
    return "safetensors " + "/".join(names.get(d, d) for d in dtypes)


def model_config(path: Path) -> ModelConfig:
    return load_gguf_config(path) if is_gguf(path) else load_config(path)


def _estimate_params(config: ModelConfig) -> tuple[int | None, int | None]:
    """(total, active) from the estimator, which knows every family's tensors."""
    try:
        pc = count_params(config)
    except Exception:  # an architecture the estimator cannot count still gets its tensors counted
        return None, None
    return int(pc.total), int(pc.active)


def model_params(path: Path, config: ModelConfig | None = None) -> tuple[int | None, int | None]:
    """(total, active) parameters: counted from the tensors themselves where they are not packed."""
    if is_gguf(path):
        total = _gguf_params(path)
    else:
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("quantization_config"):  # packed int4/nf4 tensors: count from the architecture instead
            total = None
        else:
            total = 0
            for v in _tensor_headers(path).values():
                n = 1
                for s in v["shape"]:
                    n *= s
                total += n
    est_total, est_active = (None, None)
    if config is not None:
        est_total, est_active = _estimate_params(config)
    total = total or est_total
    # The estimator knows which experts a token skips; keep our exact count and subtract those.
    active = total - (est_total - est_active) if (total and est_total and est_active) else total
    if config is not None and config.is_moe and total and not est_total:
        # Experts a token does not use: (E - k) per MoE layer, each gate+up+down (or fc+proj).
        per_expert = (3 if config.gated_mlp else 2) * config.hidden_size * config.moe_intermediate_size
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers)) or config.num_layers
        active = total - moe_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    return total, active


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def loadable_dir(d: Path) -> bool:
    """A directory our engine can load: a supported family's config.json and safetensors weights."""
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    family = cfg.get("model_type")
    if family == "gemma3" and "text_config" in cfg:
        family = "gemma3_text"
    return family in SUPPORTED_FAMILIES and any(d.glob("*.safetensors"))


def gguf_tag(filename: str) -> str:
    """The Ollama-style tag of a GGUF file name (its quant type), else the file stem."""
    name = filename.rsplit("/", 1)[-1]
    stem = gguf_group(name)[: -len(".gguf")]
    m = _QUANT_TAG.findall(stem)
    return m[-1] if m else stem


def snapshot_ggufs(snapshot: Path) -> list[Path]:
    """One .gguf per model (the first part of a split file)."""
    seen, out = set(), []
    for p in sorted(snapshot.rglob("*.gguf")):
        g = gguf_group(str(p.relative_to(snapshot)))
        if g not in seen:
            seen.add(g)
            out.append(p)
    return out


# ---- `llm show` ------------------------------------------------------------------------------------


def _chat_template(path: Path) -> str | None:
    if is_gguf(path):
        return gguf_metadata(path).get("tokenizer.chat_template")
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            t = json.loads((path / name).read_text()).get("chat_template")
        except (OSError, ValueError):
            continue
        if t:
            return t if isinstance(t, str) else json.dumps(t)
    return None


def _special_tokens(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if is_gguf(path):
        meta = gguf_metadata(path)
        tokens = meta.get("tokenizer.ggml.tokens") or []
        for key in ("bos", "eos", "unknown", "padding"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and 0 <= int(i) < len(tokens):
                out[{"unknown": "unk", "padding": "pad"}.get(key, key)] = tokens[int(i)]
        return out
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            d = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = d.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and key[:-6] not in out:
                out[key[:-6]] = v
    return out


def _files(path: Path) -> list[tuple[str, int]]:
    if is_gguf(path):
        parts = [p for p in sorted(path.parent.glob("*.gguf")) if gguf_group(p.name) == gguf_group(path.name)]
        return [(p.name, p.stat().st_size) for p in parts]
    return [(str(p.relative_to(path)), p.stat().st_size) for p in sorted(path.rglob("*")) if p.is_file()]


def show_model(path: Path) -> dict:
    """Everything `llm show` prints about a resolved model, as plain data."""
    cfg = model_config(path)
    total, active = model_params(path, cfg)
    template = _chat_template(path)
    files = _files(path)
    quant = model_format(path)
    return {
        "path": str(path),
        "architecture": cfg.family,
        "format": quant,
        "parameters": total,
        "active_parameters": active,
        "context_length": cfg.max_position_embeddings,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "experts": cfg.num_experts or None,
        "experts_per_token": cfg.num_experts_per_tok or None,
        "quantization": None if quant.startswith("safetensors") else quant,
        "chat_template": template is not None,
        "special_tokens": _special_tokens(path),
        "files": [{"name": n, "size": s} for n, s in files],
        "size": sum(s for _, s in files),
    }
