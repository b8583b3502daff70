"""Write a quantized model directory from a safetensors directory or a GGUF file, one tensor at a time.

Source tensors are read memory-mapped (safe_open / GGUFReader) and quantized one by one, and output shards
are flushed every SHARD_BYTES, so peak memory is about one layer's fp32 weight plus one output shard --
never the whole fp32 model. Everything is written into a temporary sibling directory (llmcli.paths.temp_path:
hidden, named after the destination and this process, so a later run removes it if this one is killed) that is
renamed onto the destination only once complete. check_output refuses, before any work, an output that exists
(without force), that is, holds or lies inside the source, or that cannot be created.

Which tensors are quantized is decided by building the engine's model on the meta device and running
prepare_model on it: a checkpoint tensor is quantized iff the module it loads into (after q/k/v and
gate/up fusing) became a quantized module, so writer and loader cannot disagree.

spec.format picks the layout of the quantized tensors and the config: ours (llmcli.quant.int4/int8), or the
compressed-tensors and GPTQ layouts other engines load (llmcli.quant.compressed_tensors, llmcli.quant.gptq_format);
those store one group size for the whole model (resolve_export_spec) and quantize the decoder's dense linears only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcli.config import from_hf_dict, load_config
from llmcli.errors import UserError
from llmcli.estimate import effective_group_size
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.formats.gguf_tensors import dense_tensor, iter_gguf_raw, iter_gguf_tensors
from llmcli.formats.safetensors import iter_safetensors, open_safetensors, safetensors_files
from llmcli.models.transformer import Transformer
from llmcli.models.weights import rename, target_module
from llmcli.paths import aside_path, give_umask_modes, remove_path, remove_stale_temps, temp_path
from llmcli.quant import (
    QuantSpec,
    compressed_tensors,
    gptq_format,
    quantizable_embeddings,
    quantizable_experts,
    quantizable_linears,
)
from llmcli.quant.experts import QuantExpertProj, make_quant_experts
from llmcli.quant.gptq import gptq_quantize
from llmcli.quant.hqq import quantize_int4_hqq
from llmcli.quant.int4 import pack_int4, quantize_int4_rtn
from llmcli.quant.int8 import quantize_int8
from llmcli.quant.nf4 import bnb_quantization_config, nf4_targets, quantize_nf4_tensor
from llmcli.quant.prepare import make_quant_module
from llmcli.tokenizer import load_tokenizer

SHARD_BYTES = 2 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
# Written in the source's dtype: DeepSeek-V3's router correction bias is an fp32 buffer the engine keeps in fp32
# (bf16 would reorder near-tied experts); it is E values per layer.
KEEP_SOURCE_DTYPE = ("e_score_correction_bias",)


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, ...]
    group_size: int | None  # int4: the group size used (may be smaller than requested)


@dataclass
class Summary:
    spec: QuantSpec
    output: Path
    layers: list[LayerRecord] = field(default_factory=list)
    kept: int = 0  # tensors left in 16 bits
    bytes_before: int = 0  # the source's weights as 16-bit (what a bf16 checkpoint would take)
    bytes_after: int = 0  # safetensors written
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def group_sizes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.layers:
            if r.group_size is not None:
                out[r.group_size] = out.get(r.group_size, 0) + 1
        return out


# ---- source access -------------------------------------------------------------------------------------------
def open_source(path: Path) -> tuple[dict, Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """(HF config dict, a function returning a fresh tensor iterator) for a model dir or a .gguf file."""
    if is_gguf(path):
        cfg = dict(load_gguf_config(path).raw)
        return cfg, lambda: iter_gguf_tensors(path, torch.float32)
    cfg = dict(load_config(path).raw)  # checked: a corrupt config.json is one error line naming it
    return cfg, lambda: iter_safetensors(path)


def norm_fed_modules(config, targets: dict) -> dict[str, str]:
    """Engine module -> the RMSNorm weight (engine name) whose output is its input, for the dense q/k/v
    projections among targets: x_hat has unit mean square per token, so the norm's squared gain estimates each
    input's E[x^2] up to a constant (hqq multiplies it into its column importance). gate/up read a norm's output
    too, but weighting them by it raised SmolLM2's perplexity (dev texts, mean +18.4% -> +19.2%) where q/k/v's
    lowered it (-> +15.3%), so they keep the plain prior, as do experts, MLA and o/down."""
    out = {}
    for i in range(config.num_layers):
        module = f"model.layers.{i}.self_attn.qkv_proj"
        if module in targets:
            out[module] = f"model.layers.{i}.input_layernorm.weight"
    return out


def read_source_tensors(path: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The few tensors named in wanted (engine names), read from the source before the main pass: nothing makes
    a norm come before the layers it feeds in file order (a shard boundary can fall between them)."""
    found: dict[str, torch.Tensor] = {}
    if not wanted:
        return found
    if is_gguf(path):
        for raw in iter_gguf_raw(path):
            if rename(raw.name) in wanted:
                found[rename(raw.name)] = dense_tensor(raw, path).float()
        return found
    for f in safetensors_files(path):
        with open_safetensors(f) as st:
            for name in st.keys():
                if rename(name) in wanted:
                    found[rename(name)] = st.get_tensor(name).float()
    return found


def quantized_targets(config, spec: QuantSpec) -> dict[str, torch.nn.Module]:
    """Engine module name -> the quantized module prepare_model puts there (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(config)
        chosen = quantizable_linears(model, spec) + quantizable_embeddings(model, spec)
        targets = {name: make_quant_module(m, spec) for name, m in chosen}
        for name, m in quantizable_experts(model, spec):  # each stacked projection is a target of its own
            qe = make_quant_experts(m, spec.bits, spec.group_size)
            targets.update({f"{name}.gate_up_proj": qe.gate_up_proj, f"{name}.down_proj": qe.down_proj})
        return targets


def _is_head(name: str) -> bool:
    return rename(name) == "lm_head.weight"


def quantize_tensor(
    w: torch.Tensor, qmod, spec: QuantSpec, hessian: torch.Tensor | None = None, importance: torch.Tensor | None = None
) -> dict:
    """One weight [out, in] -> {suffix: tensor} in the on-disk layout of qmod's class. importance: the inputs'
    E[x^2] estimate [in] for hqq's search (see norm_fed_modules); other methods ignore it."""
    if spec.method == "gptq" and hessian is not None:
        q, scales, zeros = gptq_quantize(w, hessian, spec.bits, getattr(qmod, "group_size", None))
        if spec.bits == 8:
            return {"qweight": q, "scales": scales}
    elif spec.bits == 8:
        q, scales = quantize_int8(w)
        return {"qweight": q, "scales": scales}
    elif spec.method == "hqq":
        q, scales, zeros = quantize_int4_hqq(w, qmod.group_size, importance=importance)
    else:
        q, scales, zeros = quantize_int4_rtn(w, qmod.group_size)
    if spec.bits == 8:
        return {"qweight": q, "scales": scales}
    return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros}


class ShardWriter:
    """Accumulates tensors and flushes a safetensors shard whenever SHARD_BYTES is reached."""

    def __init__(self, directory: Path, metadata: dict | None = None):
        self.dir, self.meta = directory, metadata or {"format": "pt"}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.dir / fname), metadata=self.meta)
        self.shards.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.dir / self.shards[0][0], self.dir / "model.safetensors")
            return
        total = sum((self.dir / f).stat().st_size for f, _ in self.shards)
        weight_map = {n: f for f, names in self.shards for n in names}
        (self.dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def keep_dtype(cfg: dict) -> torch.dtype:
    """Unquantized tensors are written in the model's 16-bit dtype (bf16 when the source is fp32)."""
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return torch.float16 if name == "float16" else torch.bfloat16


def write_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and template files (for a GGUF, build them from its metadata)."""
    if not is_gguf(src):
        copied = []
        for n in TOKENIZER_FILES:
            if (src / n).is_file():
                shutil.copyfile(src / n, dst / n)  # contents only: the output's modes follow the umask
                copied.append(n)
        return copied
    tok = load_tokenizer(src)
    tok.backend.save(str(dst / "tokenizer.json"))
    tc = {**tok.special_tokens, "add_bos_token": tok.add_bos_token}
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]


def checkpoint_targets(config, spec: QuantSpec) -> dict[str, torch.nn.Module]:
    """Engine module name -> the quantized module a checkpoint written with spec loads into."""
    if spec.method == "nf4":
        # bitsandbytes has no stacked-expert layout (transformers would not load one): experts stay 16-bit
        return {k: v for k, v in nf4_targets(config).items() if not isinstance(v, QuantExpertProj)}
    return quantized_targets(config, spec)


def input_gains(src: Path, config, targets: dict, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Engine module -> its inputs' known E[x^2] up to a constant, for int4 hqq (empty for other methods).

    hqq's search weighs each input column by its E[x^2]; for layers fed by an RMSNorm part of it is known
    without data: the norm's effective gain squared (gemma's is 1 + w)."""
    if spec.method != "hqq" or spec.bits != 4:
        return {}
    fed = norm_fed_modules(config, targets)
    norms = read_source_tensors(src, set(fed.values()))
    return {m: (config.norm_offset + norms[n]).pow(2) for m, n in fed.items() if n in norms}


def resolve_export_spec(config, spec: QuantSpec) -> QuantSpec:
    """For --format compressed-tensors / gptq: the spec with the one group size every quantized layer uses (the
    formats store one per model: the largest power of two up to the requested size dividing every input size).
    Raises UserError for what the formats cannot hold here (MoE experts), before any work."""
    if spec.format == "llmcli":
        return spec
    if config.is_moe:
        raise UserError(f"--format {spec.format} writes dense models only; MoE experts need --format llmcli")
    if spec.bits == 8:
        return spec
    ins = [m.in_features for m in quantized_targets(config, spec).values()]
    group = min(effective_group_size(k, spec.group_size) for k in ins)
    if group < 16 or any(k % group for k in ins):
        raise UserError(f"--format {spec.format}: no group size of 16 or more divides every layer's input size")
    return replace(spec, group_size=group)


def resolve_source_spec(src: Path, spec: QuantSpec) -> QuantSpec:
    """resolve_export_spec for the model at src (reads its config only): the CLI's check before calibration."""
    if spec.format == "llmcli":
        return spec
    cfg, _ = open_source(src)
    return resolve_export_spec(from_hf_dict(cfg), spec)


def _export_parts(
    w: torch.Tensor, qmod, spec: QuantSpec, dtype16: torch.dtype, hessian: torch.Tensor | None, importance
) -> dict[str, torch.Tensor]:
    group = getattr(qmod, "group_size", 0)
    if spec.format == "gptq":
        return gptq_format.quantize_parts(w, group, spec.method, dtype16, hessian)
    return compressed_tensors.quantize_parts(w, spec.bits, group, spec.method, dtype16, hessian, importance)


def _quantize_parts(
    w: torch.Tensor,
    qmod,
    spec: QuantSpec,
    hessian: torch.Tensor | None,
    importance: torch.Tensor | None,
    dtype16: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """One source tensor -> its stored parts ({suffix: tensor}) for the target module qmod."""
    if spec.format != "llmcli":
        return _export_parts(w, qmod, spec, dtype16, hessian, importance)
    if spec.method == "nf4":
        return quantize_nf4_tensor(w, hessian)
    if spec.method == "gptq" and isinstance(qmod, QuantExpertProj):
        # calibration hooks see Linear inputs only, so experts have no Hessian: calibration-free instead
        spec = replace(spec, method="hqq" if spec.bits == 4 else "rtn")
    return quantize_tensor(w, qmod, spec, hessian, importance)


def _write_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    writer: ShardWriter,
    summary: Summary,
    *,
    config,
    targets: dict,
    dtype16: torch.dtype,
    hessians: dict[str, torch.Tensor] | None,
    importance: dict[str, torch.Tensor],
    progress: Callable[[str], None] | None,
) -> int:
    """Stream every source tensor into writer: quantized when it loads into one of targets, else kept (16-bit).
    Fills summary's sizes, kept count and layer records; returns how many expert tensors gptq left to hqq/rtn."""
    spec = summary.spec
    # a tied model stores one quantized table: the loader points the quantized head at the embedding's
    tied_table = config.tie_word_embeddings and "model.embed_tokens" in targets
    expert_fallbacks = 0
    for name, w in tensors:
        if tied_table and _is_head(name):
            continue  # a copy of the tied embedding some checkpoints carry anyway
        summary.bytes_before += w.numel() * 2
        module = target_module(name, targets)
        if module is None:
            to16 = w.is_floating_point() and not name.endswith(KEEP_SOURCE_DTYPE)
            writer.add(name, w.to(dtype16) if to16 else w)
            summary.kept += 1
            continue
        if progress:
            progress(name)
        prefix = name.removesuffix(".weight")  # a stacked expert tensor has no `.weight`
        qmod = targets[module]
        h = (hessians or {}).get(module)  # keyed by engine module: q/k/v share qkv_proj's inputs
        if spec.method == "gptq" and isinstance(qmod, QuantExpertProj):
            expert_fallbacks += 1
        for suffix, t in _quantize_parts(w, qmod, spec, h, importance.get(module), dtype16).items():
            writer.add(f"{prefix}.{suffix}", t)
        summary.layers.append(LayerRecord(prefix, tuple(w.shape), getattr(qmod, "group_size", None)))
    return expert_fallbacks


def _write_config(directory: Path, cfg: dict, spec: QuantSpec, dtype16: torch.dtype) -> None:
    """config.json: the source's, plus the quantization_config the loader reads (and the 16-bit dtype written)."""
    cfg = dict(cfg)
    if spec.format == "compressed-tensors":  # the head (tied or not) is the one Linear left 16-bit
        cfg["quantization_config"] = compressed_tensors.quantization_config(spec.bits, spec.group_size, ["lm_head"])
    elif spec.format == "gptq":
        cfg["quantization_config"] = gptq_format.quantization_config(spec.group_size)
    elif spec.method == "nf4":
        cfg["quantization_config"] = bnb_quantization_config()
    else:
        cfg["quantization_config"] = spec.to_config()
    # the tensors left unquantized are dtype16 (bf16 from an fp32 source): both spellings say so, since transformers 5
    # reads `dtype` (which a source saved by it carries) and older readers `torch_dtype`
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype16).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str))


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --force: the old output goes only once the new one is complete
        old = aside_path(out)  # a kill between the two renames: remove_stale_temps puts it back
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


def _first_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(src: Path, out: Path, *, force: bool = False) -> None:
    """Refuse an output before any work is done: one that exists (without force), that is the source, holds it
    or lies inside it, or whose directory cannot be created or written (probed by creating this run's temporary
    entry there). Stale temporary outputs of killed runs next to out are removed on the way."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    s, o = src.resolve(), out.resolve()
    if o == s or s.is_relative_to(o) or o.is_relative_to(s):
        how = "is" if o == s else ("holds" if s.is_relative_to(o) else "is inside")
        raise UserError(f"refusing to write {out}: it {how} the source model {src}; choose another --output")
    base = _first_existing(out.parent)
    if not base.is_dir():
        raise UserError(f"cannot write {out}: {base} is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent)
        probe = temp_path(out)
        remove_path(probe)  # this PID's own leftover (only this process can own the name)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def _summary_notes(summary: Summary, expert_fallbacks: int) -> list[str]:
    spec, notes = summary.spec, []
    requested = spec.group_size
    smaller = sorted({r.group_size for r in summary.layers if r.group_size and r.group_size != requested})
    if spec.bits == 4 and spec.method != "nf4" and smaller:
        n = sum(1 for r in summary.layers if r.group_size != requested)
        notes.append(
            f"{n} layers use group size {', '.join(map(str, smaller))}: their input size is not a "
            f"multiple of {requested}"
        )
    if expert_fallbacks:
        notes.append(
            f"{expert_fallbacks} expert tensors use {'hqq' if spec.bits == 4 else 'rtn'}: gptq "
            "collects Hessians for Linear layers only, not per expert"
        )
    return notes


def quantize_checkpoint(
    src: Path,
    out: Path,
    spec: QuantSpec,
    *,
    force: bool = False,
    hessians: dict[str, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Summary:
    """Quantize the model at src (directory or .gguf) into the directory out."""
    t0 = time.perf_counter()
    spec.validate()
    check_output(src, out, force=force)
    cfg, tensors = open_source(src)
    config = from_hf_dict(cfg)
    requested, spec = spec.group_size, resolve_export_spec(config, spec)
    targets = checkpoint_targets(config, spec)
    summary = Summary(spec=spec, output=out)
    dtype16 = keep_dtype(cfg)
    tmp = temp_path(out)
    tmp.mkdir()  # 0777 & ~umask, as the output will be
    try:
        writer = ShardWriter(tmp)
        importance = input_gains(src, config, targets, spec)
        expert_fallbacks = _write_tensors(
            tensors(),
            writer,
            summary,
            config=config,
            targets=targets,
            dtype16=dtype16,
            hessians=hessians,
            importance=importance,
            progress=progress,
        )
        writer.close()
        if not summary.layers:
            raise UserError(f"{src} has no layers this quantizer can handle")
        _write_config(tmp, cfg, spec, dtype16)
        write_tokenizer(src, tmp)
        summary.bytes_after = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        give_umask_modes(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        remove_path(tmp)
        raise
    summary.notes.extend(_summary_notes(summary, expert_fallbacks))
    if spec.format != "llmcli" and spec.bits == 4 and spec.group_size != requested:
        summary.notes.append(
            f"every layer uses group size {spec.group_size}: {spec.format} stores one, and some input sizes "
            f"are not a multiple of {requested}"
        )
    if spec.format == "compressed-tensors" and spec.bits == 4 and spec.method == "hqq":
        summary.notes.append("hqq's zero points rounded to integers (the format's), min/max where that is closer")
    summary.seconds = time.perf_counter() - t0
    return summary
