"""Reference compressed-tensors checkpoints: a model quantized by the compressed-tensors package's own lifecycle
(apply_quantization_config, min/max qparams from its calculate_qparams, ModelCompressor's compress and
update_config), with no llmcli code in the path. Imported by tests/quant and scripts/ct_transformers_routes.py."""

from __future__ import annotations

from pathlib import Path

import torch


def reference_scheme(bits: int, group: int | None, symmetric: bool) -> dict:
    """A W4A16/W8A16 weight-only scheme in the package's own schema: INT4 group-wise, INT8 per channel."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group else "channel",
        "group_size": group,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "initialized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }


def write_reference_checkpoint(src: Path, out: Path, bits: int, group: int | None, symmetric: bool) -> Path:
    """src (a transformers directory) -> out, quantized and saved by compressed-tensors (bf16 scales)."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig.model_validate(reference_scheme(bits, group, symmetric)))
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "quantization_scheme"):
                continue
            w = module.weight.float()
            wg = w.reshape(w.shape[0], -1, group or w.shape[1])  # per group, or one group per row (channel)
            scale, zero = calculate_qparams(wg.amin(-1), wg.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    return out
