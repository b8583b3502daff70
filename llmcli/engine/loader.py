"""Weights -> model: build the transformer without initializing it (llmcli.models.empty), then stream tensors in one
by one.

Sources: safetensors (single file or sharded with model.safetensors.index.json), memory-mapped with safe_open,
and GGUF through llmcli.quant.gguf_kept.iter_gguf_kept. Each tensor is copied straight into its (already allocated)
parameter on the target device/dtype, so peak host memory stays near one copy of the model.

Name handling is data (llmcli.models.weights): prefix renames strip wrappers (multimodal checkpoints), FUSED maps
separate q/k/v and gate/up projections onto rows of the fused Linear. A module may also define
`load_hf_weight(suffix, tensor) -> bool` to take tensors it stores differently (e.g. stacked experts).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llmcli.config import ModelConfig, load_config
from llmcli.errors import UserError
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.formats.gguf_tensors import gguf_tensor_types
from llmcli.formats.safetensors import iter_safetensors
from llmcli.models.empty import empty_init, to_empty
from llmcli.models.transformer import Transformer
from llmcli.models.weights import FUSED, fused_shards, rename, target_module
from llmcli.quant import QuantSpec, compressed_tensors, gptq_format, quantizable_linears
from llmcli.quant.embedding import HalfEmbedding, Int8Embedding, QuantEmbedding, tie_quantized_head
from llmcli.quant.gguf_kept import KEEP_INT4, KEEP_INT8, KEPT_GROUP_SIZE, iter_gguf_kept
from llmcli.quant.linear import HalfLinear, Int4OffsetLinear, Int8Linear
from llmcli.quant.prepare import prepare_model, set_module


def load_weights(
    model: nn.Module, config: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], source: str | Path = ""
) -> None:
    """Copy every tensor into its parameter; raise UserError for weights the model needs but never got, or one
    whose shape is not the config's (source, the checkpoint's path, is named in both messages)."""
    where = f"{source}: " if source else ""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    with torch.no_grad():
        for raw_name, tensor in tensors:
            name = rename(raw_name)
            if name is None:
                continue
            try:
                key = _load_one(params, modules, config, name, tensor)
            except ShapeMismatch as e:
                raise UserError(f"{where}{e}") from None
            if key is not None:
                loaded.add(key)
            # unknown tensors (e.g. extra heads) are ignored; missing ones are reported below
    missing = _missing(params, config, loaded)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{where}the checkpoint lacks weights the model needs: {', '.join(missing[:3])}{more}")


def _load_one(params: dict, modules: dict, config: ModelConfig, name: str, tensor: torch.Tensor) -> str | None:
    """Copy one (renamed) tensor where it belongs: its parameter, a shard of a fused one, or a module's own
    load_hf_weight. Returns what it filled (a parameter name, `name#shard`), None for a tensor nothing takes."""
    if name in params:
        _copy(params[name], tensor, name)
        return name
    module_path, _, suffix = name.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    if leaf in FUSED and f"{parent}.{FUSED[leaf][0]}.{suffix}" in params:
        fused, shard = FUSED[leaf]
        target = f"{parent}.{fused}.{suffix}"
        p = params[target]
        sizes = fused_shards(config, fused)
        # rows scale with the parameter (quantized formats may pack rows): offsets are proportional
        total = sum(sizes)
        lo = p.shape[0] * sum(sizes[:shard]) // total
        hi = p.shape[0] * sum(sizes[: shard + 1]) // total
        _copy(p[lo:hi], tensor, name)
        return f"{target}#{shard}"
    if _module_hook(modules, name, tensor):
        return name
    return None


def _missing(params: dict, config: ModelConfig, loaded: set[str]) -> list[str]:
    """Parameters no tensor filled, in model order (tied heads and hook-filled parameters count as filled)."""
    missing = []
    for pname, p in params.items():
        leaf = pname.rsplit(".", 2)
        if pname in loaded:
            continue
        fused = leaf[-2] if len(leaf) >= 2 else ""
        if fused in ("qkv_proj", "gate_up_proj"):
            n = len(fused_shards(config, fused))
            if all(f"{pname}#{s}" in loaded for s in range(n)):
                continue
        if pname.startswith("lm_head.") and config.tie_word_embeddings:  # shares embed_tokens' tensors
            continue
        if getattr(p, "_llmcli_loaded", False):  # set by load_hf_weight hooks
            continue
        missing.append(pname)
    return missing


def _module_hook(modules: dict, name: str, tensor: torch.Tensor) -> bool:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        m = modules.get(".".join(parts[:cut]))
        if m is not None and hasattr(m, "load_hf_weight"):
            return bool(m.load_hf_weight(".".join(parts[cut:]), tensor))
        if m is None and parts[cut - 1] in FUSED:  # e.g. q_proj.weight.absmax: a fused module's shard
            fused, shard = FUSED[parts[cut - 1]]
            m = modules.get(".".join(parts[: cut - 1] + [fused]))
            if m is not None and hasattr(m, "load_hf_weight"):
                return bool(m.load_hf_weight(".".join(parts[cut:]), tensor, shard=shard))
    return False


class ShapeMismatch(UserError):
    """A checkpoint tensor whose shape is not the one the config gives its parameter."""


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeMismatch(f"weight {name} has shape {tuple(src.shape)}, the config expects {tuple(dst.shape)}")
    dst.copy_(src)


def build_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, quantization_config: dict | None = None, swap=None
) -> nn.Module:
    """Allocate (not initialize) the model on device; quantization swaps modules before allocation
    (from a checkpoint's quantization_config, or `swap(meta_model)`: a GGUF's kept-quantized linears)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with empty_init():
            model = Transformer(config)
            if quantization_config:
                prepare_model(model, config, quantization_config)
            if swap is not None:
                swap(model)
    finally:
        torch.set_default_dtype(prev)
    model = to_empty(model, device)
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
    elif config.tie_word_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding):
        tie_quantized_head(model)  # one quantized table serves the lookup and the head's kernel
    return model.eval()


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, dequantize: bool = False
) -> tuple[nn.Module, ModelConfig]:
    """A model directory (config.json + safetensors) or a .gguf file -> (model on device, ModelConfig).

    compressed-tensors (pack-quantized) and GPTQ checkpoints load into the same int4/int8 modules as ours where
    the math is the same (llmcli.quant.compressed_tensors, llmcli.quant.gptq_format), else dequantized.
    A GGUF's Q4_0/Q4_1/Q8_0 linears stay quantized in our kernels (as llama.cpp runs them) unless
    dequantize=True, which expands every tensor to dtype (for exact comparisons against a float reference).
    """
    path = Path(path)
    device = torch.device(device)
    if is_gguf(path):
        config = load_gguf_config(path)
        plan = {} if dequantize else gguf_keep_plan(config, gguf_tensor_types(path))
        keep = {src: kind for kind, sources in plan.values() for src in sources}
        model = build_model(config, device, dtype, swap=lambda m: _swap_kept(m, plan))
        load_weights(model, config, iter_gguf_kept(path, dtype, keep), path)
    else:
        config = load_config(path)
        qcfg, tensors = config.raw.get("quantization_config"), iter_safetensors(path)
        for fmt in (compressed_tensors, gptq_format):  # other engines' layouts, re-laid into ours as they stream
            if fmt.handles(qcfg):
                qcfg, tensors = fmt.as_llmcli(qcfg, tensors)
        model = build_model(config, device, dtype, qcfg)
        load_weights(model, config, tensors, path)
    return model, config


# ---- GGUF: which linears stay quantized ------------------------------------------------------------------


def gguf_keep_plan(config: ModelConfig, types: dict[str, object]) -> dict[str, tuple[str, list[str]]]:
    """Engine module name -> (kind, the GGUF weight names loaded into it).

    A linear of the decoder layers (or lm_head) stays quantized when every tensor fused into it (q/k/v,
    gate/up) is Q4_0/Q4_1 ("int4": llmcli.quant.linear.Int4OffsetLinear, group 32) or every one is Q8_0
    ("int8": Int8Linear). A Q8_0 token embedding becomes an Int8Embedding; tied, lm_head shares its table
    (the loader ties them), so the output projection -- the largest matmul of a small model -- runs the
    int8 kernel too. An F16 token embedding of a tied model whose decoder linears are kept becomes a
    HalfEmbedding and its head a HalfLinear ("f16": the file's fp16 values, half the bytes of the fp32 head
    that dominates a small model's decode; `llm quantize --format gguf` writes embeddings F16). Anything else
    (K-quants, other F16 weights, a mix of 4- and 8-bit parts, Q4 embeddings, MoE
    experts, norms) is expanded to the model dtype as before.
    """
    with empty_init():
        model = Transformer(config)
    targets = dict(quantizable_linears(model, QuantSpec(bits=8, quantize_embeddings=True)))
    sources: dict[str, list[str]] = {}
    for name in types:
        module = target_module(name, targets) if name.endswith(".weight") else None
        if module is not None:
            sources.setdefault(module, []).append(name)
    plan = {}
    for module, names in sources.items():
        leaf = module.rsplit(".", 1)[-1]
        if len(names) > 1 and len(names) != len(fused_shards(config, leaf)):
            continue  # a fused module missing a part: expanded, and load_weights reports what is missing
        kinds = {types[n].name for n in names}
        if kinds <= set(KEEP_INT4) and targets[module].in_features % KEPT_GROUP_SIZE == 0:
            plan[module] = ("int4", names)
        elif kinds <= set(KEEP_INT8):
            plan[module] = ("int8", names)
    emb = types.get("model.embed_tokens.weight")
    if emb is not None and emb.name in KEEP_INT8 and type(model.model.embed_tokens) is nn.Embedding:
        plan["model.embed_tokens"] = ("int8", ["model.embed_tokens.weight"])
        if config.tie_word_embeddings and "lm_head" in targets:
            plan["lm_head"] = ("int8", [])  # no tensor of its own: it shares the embedding's
    elif emb is not None and emb.name == "F16" and plan and config.tie_word_embeddings and "lm_head" in targets:
        plan["model.embed_tokens"] = ("f16", [])  # loaded as a plain tensor, cast exactly into fp16
        plan["lm_head"] = ("f16", [])
    return plan


def _swap_kept(model: nn.Module, plan: dict[str, tuple[str, list[str]]]) -> None:
    """Replace the planned nn.Linear modules of the meta-device model by quantized ones (before allocation)."""
    for module, (kind, _) in plan.items():
        m = model.get_submodule(module)
        if isinstance(m, nn.Embedding):
            new = (HalfEmbedding if kind == "f16" else Int8Embedding)(m.num_embeddings, m.embedding_dim)
        elif kind == "f16":
            new = HalfLinear(m.in_features, m.out_features)
        elif kind == "int4":
            new = Int4OffsetLinear(m.in_features, m.out_features, KEPT_GROUP_SIZE, m.bias is not None)
        else:
            new = Int8Linear(m.in_features, m.out_features, m.bias is not None)
        set_module(model, module, new)
