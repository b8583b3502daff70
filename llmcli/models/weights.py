"""Checkpoint weight names -> the engine model's names: prefix renames, skipped tensors, and which checkpoint
weight loads into which (fused or stacked) module.

This is model knowledge shared by the loader (filling a model), the checkpoint writer (deciding what to quantize)
and the GGUF keep plan (which linears stay quantized), so all three agree on every name.
PREFIX_RENAMES strips wrappers (multimodal checkpoints); FUSED maps separate q/k/v and gate/up projections onto
shards (row blocks) of the engine's fused Linear; per-expert tensors map onto stacked expert projections
(llmcli.layers.moe.PER_EXPERT).
"""

from __future__ import annotations

import re

from llmcli.config import ModelConfig
from llmcli.layers.moe import PER_EXPERT

# Checkpoint prefixes of models that wrap a text decoder (gemma3 multimodal, v4 and v5 spellings).
PREFIX_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
SKIP_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)

# separate projection -> (fused module, shard index); shard sizes come from fused_shards()
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")


def fused_shards(config: ModelConfig, fused: str) -> list[int]:
    """Output features of each shard of a fused projection, in row order."""
    if fused == "qkv_proj":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return [q, kv, kv]
    return [config.intermediate_size, config.intermediate_size]


def rename(name: str) -> str | None:
    """Checkpoint tensor name -> the engine's name for it, or None for a tensor the engine does not load."""
    if name.startswith(SKIP_PREFIXES) or name.endswith(SKIP_SUFFIXES):
        return None
    # mixtral's sparse block is `block_sparse_moe` in checkpoints, `mlp` (llmcli.layers.moe.MoE) here
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for old, new in PREFIX_RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def stacked_name(module: str) -> str | None:
    """Per-expert checkpoint module -> the stacked projection it is a slice of:
    `...experts.3.gate_proj` / `...experts.3.w1` -> `...experts.gate_up_proj`; None for anything else."""
    m = _EXPERT_TENSOR.match(module)
    if m is None or m.group(3) not in PER_EXPERT:
        return None
    return f"{m.group(1)}.{PER_EXPERT[m.group(3)][0]}"


def target_module(name: str, targets: dict) -> str | None:
    """Checkpoint tensor name -> engine module name it loads into if that module is in targets
    (the checkpoint writer and the loader's GGUF keep plan ask the same question)."""
    name = rename(name)
    if name in targets:  # a stacked expert tensor (transformers v5 `experts.gate_up_proj`) is named like its module
        return name
    if name is None or not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    if module in targets:
        return module
    stacked = stacked_name(module)  # one expert's slice: `experts.3.gate_proj` -> `experts.gate_up_proj`
    if stacked is not None:
        return stacked if stacked in targets else None
    parent, _, leaf = module.rpartition(".")
    fused = f"{parent}.{FUSED[leaf][0]}" if leaf in FUSED else module
    return fused if fused in targets else None
