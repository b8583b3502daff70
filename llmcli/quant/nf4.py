"""NF4 (4-bit NormalFloat, blocksize 64, double quantization) through bitsandbytes, written in the tensor
layout transformers uses for bitsandbytes checkpoints:
  <module>.weight (uint8, packed), .weight.absmax, .weight.quant_map, .weight.nested_absmax,
  .weight.nested_quant_map, .weight.quant_state.bitsandbytes__nf4 (the JSON quant state as uint8)
bitsandbytes 0.50 quantizes and dequantizes NF4 on CPU, so writing needs no GPU.

Known gap: the llmcli engine does not load these yet (bnb's per-tensor quant state -- the nested offset --
does not concatenate across fused q/k/v rows); transformers + bitsandbytes load them.
"""

from __future__ import annotations

import torch

from llmcli.errors import UserError

BLOCKSIZE = 64


def bnb_quantization_config() -> dict:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"], "llm_int8_threshold": 6.0}


def nf4_targets(config) -> dict:
    """The same Linear modules as INT4 (decoder-layer projections)."""
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import quantized_targets

    return quantized_targets(config, QuantSpec(bits=4, group_size=64, method="rtn"))


def quantize_nf4_tensor(w: torch.Tensor) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.to(torch.bfloat16).contiguous(), blocksize=BLOCKSIZE,
                                  compress_statistics=True, quant_type="nf4")
    parts = {"weight": q}
    for k, v in state.as_dict(packed=True).items():
        parts[f"weight.{k}"] = v
    return parts


def dequantize_nf4_tensor(parts: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    qs = {k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"}
    state = QuantState.from_dict(qs, device=torch.device(device))
    return bnbf.dequantize_4bit(parts["weight"], state)


def prepare_model_nf4(model, config, quantization_config: dict):
    raise UserError("this is a bitsandbytes NF4 checkpoint: the llmcli engine cannot run NF4 yet "
                    "(load it with transformers + bitsandbytes, or quantize with --bits 4 --method hqq)")
