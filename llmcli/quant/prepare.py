"""Swap the engine model's modules for quantized ones according to a checkpoint's `quantization_config`.

Runs on the meta-device model, before the loader allocates and fills it (llmcli.engine.loader.build_model);
the checkpoint writer builds the same modules to decide what it quantizes (make_quant_module), so the two agree.
"""

from __future__ import annotations

from torch import nn

from llmcli.errors import UserError
from llmcli.estimate import effective_group_size
from llmcli.quant import QuantSpec, quantizable_embeddings, quantizable_experts, quantizable_linears
from llmcli.quant.embedding import make_quant_embedding
from llmcli.quant.experts import make_quant_experts
from llmcli.quant.linear import Int4Linear, Int8Linear
from llmcli.quant.nf4 import make_nf4_linear, nf4_linears


def make_quant_module(m: nn.Module, spec: QuantSpec) -> nn.Module:
    """The quantized replacement of an nn.Linear or nn.Embedding the spec selected."""
    if isinstance(m, nn.Embedding):
        return make_quant_embedding(m, spec.bits, spec.group_size)
    return make_quant_linear(m, spec)


def make_quant_linear(m: nn.Linear, spec: QuantSpec) -> nn.Module:
    bias = m.bias is not None
    if spec.bits == 8:
        return Int8Linear(m.in_features, m.out_features, bias)
    return Int4Linear(m.in_features, m.out_features, effective_group_size(m.in_features, spec.group_size), bias)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def prepare_model(model: nn.Module, config, quantization_config: dict) -> nn.Module:
    """Swap quantizable nn.Linear modules in place (call on the meta-device model, before loading)."""
    qc = dict(quantization_config)
    if qc.get("quant_method") == "bitsandbytes":
        return prepare_model_nf4(model, config, qc)
    spec = QuantSpec.from_config(qc)
    for name, m in quantizable_linears(model, spec) + quantizable_embeddings(model, spec):
        set_module(model, name, make_quant_module(m, spec))
    for name, m in quantizable_experts(model, spec):
        set_module(model, name, make_quant_experts(m, spec.bits, spec.group_size))
    return model


def prepare_model_nf4(model: nn.Module, config, quantization_config: dict) -> nn.Module:
    """Swap the Linear modules an NF4 checkpoint quantizes (the writer's choice: nf4_linears)."""
    qc = quantization_config
    if not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise UserError(
            "this bitsandbytes checkpoint is not NF4 4-bit: the llmcli engine runs only "
            "load_in_4bit with bnb_4bit_quant_type nf4"
        )
    for name, m in nf4_linears(model):
        set_module(model, name, make_nf4_linear(config, name, m))
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Build every quantized module's kernel layout now instead of on its first forward."""
    for m in model.modules():
        if hasattr(m, "finalize") and m is not model:
            m.finalize()
    return model
