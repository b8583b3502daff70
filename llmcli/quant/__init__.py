"""Weight-only quantization: INT8 (per output row), INT4 (group-wise; RTN, HQQ or GPTQ), NF4 (bitsandbytes).

This module: QuantSpec (what `llm quantize` was asked for, stored as config.json's `quantization_config`) and
which modules of the engine's model a spec quantizes.

Contract with the loader (llmcli.engine.loader.build_model): when config.json carries a `quantization_config`,
llmcli.quant.prepare.prepare_model() runs on the meta-device model before weights are allocated and swaps every
quantizable nn.Linear for a quantized module whose parameter names are the checkpoint's tensor suffixes
(`qweight`, `scales`, `zeros`). The loader then fills them by name, fusing q/k/v and gate/up rows; the
kernel layout is built on the first forward (or by llmcli.quant.prepare.finalize()).

What is quantized: every nn.Linear inside the decoder layers (attention and dense/shared MLP projections)
and every stacked MoE expert block (llmcli.quant.experts.QuantExperts; routers and shared_expert_gate stay 16-bit).
Embeddings, lm_head, norms and MoE routers stay 16-bit unless quantize_embeddings, which quantizes the
token embedding (llmcli.quant.embedding) and lm_head in the same per-row layout; a tied model keeps one
quantized table that serves both (the loader ties the head's tensors to the embedding's).
The checkpoint writer decides what to quantize by running prepare_model on a meta model, so the two can
never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from llmcli.errors import UserError
from llmcli.layers.moe import Experts
from llmcli.quant.experts import experts_quantizable

METHODS = ("rtn", "hqq", "gptq", "nf4")
# Checkpoint layouts the safetensors writer produces: ours, and two that other engines (vLLM, SGLang, transformers)
# load: compressed-tensors pack-quantized (INT4 asymmetric group-wise, INT8 per channel) and GPTQ (INT4 symmetric).
FORMATS = ("llmcli", "compressed-tensors", "gptq")


@dataclass
class QuantSpec:
    bits: int = 8
    group_size: int = 128  # int4 only
    method: str = "rtn"
    quantize_embeddings: bool = False  # also quantize the token embedding and lm_head
    format: str = "llmcli"  # one of FORMATS; not part of the stored llmcli config

    def validate(self) -> QuantSpec:
        if self.method == "nf4":
            self.bits = 4
        if self.bits not in (4, 8):
            raise UserError(f"--bits must be 8 or 4, not {self.bits}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits == 8 and self.method not in ("rtn", "gptq"):
            raise UserError(f"method {self.method} is for 4 bits; INT8 uses rtn (or gptq)")
        if self.bits == 4 and self.group_size not in (32, 64, 128):
            raise UserError(f"--group-size must be 32, 64 or 128, not {self.group_size}")
        if self.format != "llmcli":
            self._validate_export()
        return self

    def _validate_export(self) -> None:
        """The combinations the other engines' formats can express (checked before any work)."""
        fmt = self.format
        if fmt not in FORMATS:
            raise UserError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.method == "nf4":
            raise UserError(f"--method nf4 writes a bitsandbytes checkpoint; --format {fmt} takes rtn or gptq")
        if fmt == "gptq" and self.bits != 4:
            raise UserError("--format gptq is symmetric INT4: use --bits 4 (INT8: --format compressed-tensors)")
        if fmt == "gptq" and self.method == "hqq":
            raise UserError("--format gptq has a fixed zero point (8): use --method rtn or gptq, not hqq")
        if self.quantize_embeddings:
            raise UserError(f"--quantize-embeddings is for --format llmcli; {fmt} keeps embeddings 16-bit")

    def to_config(self) -> dict:
        d = {"quant_method": "llmcli", **asdict(self)}
        d.pop("format")
        if self.bits == 8:
            d.pop("group_size")
        return d

    @classmethod
    def from_config(cls, qc: dict) -> QuantSpec:
        if qc.get("quant_method") != "llmcli":
            raise UserError(f"unsupported quantization_config quant_method {qc.get('quant_method')!r}")
        return cls(
            bits=int(qc["bits"]),
            group_size=int(qc.get("group_size", 128)),
            method=qc.get("method", "rtn"),
            quantize_embeddings=bool(qc.get("quantize_embeddings", False)),
        )


def quantizable_linears(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear the spec quantizes, in model order."""
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        in_layers = name.startswith("model.layers.")
        if not (in_layers or (name == "lm_head" and spec.quantize_embeddings)):
            continue
        if name.endswith("shared_expert_gate") or m.out_features < 2:  # a [1, H] gate: nothing to gain
            continue
        if spec.bits == 4 and m.in_features % 2:
            continue  # int4 packs two columns per byte
        out.append((name, m))
    return out


def quantizable_embeddings(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Embedding]]:
    """(name, module) of the token embedding when the spec quantizes it (same row rules as a linear)."""
    m = model.get_submodule("model.embed_tokens")
    if not spec.quantize_embeddings or type(m) is not nn.Embedding or (spec.bits == 4 and m.embedding_dim % 2):
        return []
    return [("model.embed_tokens", m)]


def quantizable_experts(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
    """(name, module) of every stacked MoE Experts block the spec quantizes, in model order."""
    return [(n, m) for n, m in model.named_modules() if type(m) is Experts and experts_quantizable(m, spec.bits)]
