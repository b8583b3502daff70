"""Which compressed-tensors checkpoints transformers loads, by route, for ours and for the package's own output.

    .venv/bin/python scripts/ct_transformers_routes.py

On a tiny random llama (tests/conftest.py), writes INT4 group-wise asymmetric, INT4 symmetric and INT8 per-channel
pack-quantized checkpoints with `llm quantize --format compressed-tensors` (ours: no symmetric INT4) and with the
compressed-tensors package's own ModelCompressor (tests/ct_reference.py), then loads each in transformers twice:
the default route (`from_pretrained(dir)`: the model is built compressed on the meta device, the checkpoint's
tensors load into it, the first forward decompresses) and `CompressedTensorsConfig(dequantize=True)`. Prints per
checkpoint and route: loaded or the error, and the largest logit difference from our engine on the same files.
For a failure, the zero-point shape transformers built next to the one in the checkpoint.

Why asymmetric INT4 fails in the default route: transformers builds the compressed modules by running the package's
PackedQuantizationCompressor.compress on meta tensors, and that meta branch (compressed_tensors/compressors/
pack_quantized/base.py) makes weight_packed but returns before packing the zero point, which keeps its unpacked
[out, groups] shape, while the real compress (the one that writes checkpoints, and vLLM's reader) packs it to
[out / 8, groups]. Related upstream report: vllm-project/llm-compressor#1618.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import apply_quantization_config
from safetensors.torch import load_file
from transformers import CompressedTensorsConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models and the reference writer
from conftest import build_tiny_model  # noqa: E402
from ct_reference import write_reference_checkpoint  # noqa: E402

from llmcli.engine.llm_engine import LLMEngine  # noqa: E402
from llmcli.engine.loader import load_model  # noqa: E402
from llmcli.quant import QuantSpec  # noqa: E402
from llmcli.quant.checkpoint import quantize_checkpoint  # noqa: E402

IDS = list(range(3, 43))
MODULE = "model.layers.0.mlp.down_proj"


def our_logits(directory: Path) -> torch.Tensor:
    model, config = load_model(directory, "cpu", torch.float32)
    engine = LLMEngine(model, config)
    return engine.forward_logits([engine.add(IDS)], all_positions=True)[0].float()


def built_zero_point_shape(directory: Path) -> tuple | None:
    """The weight_zero_point shape transformers' default route builds before loading (meta model, compressed)."""
    cfg = json.loads((directory / "config.json").read_text())
    ct = CompressedTensorsConfig.from_dict(cfg["quantization_config"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(directory))
    compressor = ModelCompressor.from_compression_config(ct)
    apply_quantization_config(model, compressor.quantization_config, run_compressed=False)
    compressor.compress_model(model)
    zp = getattr(model.get_submodule(MODULE), "weight_zero_point", None)
    return None if zp is None else tuple(zp.shape)


def try_route(directory: Path, dequantize: bool, ours: torch.Tensor) -> str:
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw)
        with torch.no_grad():
            logits = ref(torch.tensor([IDS])).logits[0]
    except Exception as e:  # what the user sees, first line
        return f"FAILS: {type(e).__name__}: {str(e).splitlines()[0][:110]}"
    diff = float((logits - ours).abs().max()) / float(logits.abs().max())
    return f"loads, max |logit diff| / max |logit| vs our engine {diff:.4f}"


def checkpoints(root: Path) -> list[tuple[str, Path]]:
    src = build_tiny_model("llama", root / "src")
    out = []
    for bits in (4, 8):
        d = root / f"llmcli-int{bits}"
        quantize_checkpoint(src, d, QuantSpec(bits, 64, "rtn", format="compressed-tensors"))
        out.append((f"llmcli INT{bits} {'asymmetric group 64' if bits == 4 else 'symmetric channel'}", d))
    for bits, sym in ((4, False), (4, True), (8, True)):
        d = write_reference_checkpoint(src, root / f"ref-int{bits}-{sym}", bits, 64 if bits == 4 else None, sym)
        kind = ("symmetric" if sym else "asymmetric") + (" group 64" if bits == 4 else " channel")
        out.append((f"compressed-tensors INT{bits} {kind}", d))
    return out


def main() -> None:
    transformers.logging.set_verbosity_error()  # the load report table: the shapes are printed below instead
    warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # dequantize= is the point
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, directory in checkpoints(Path(tmp)):
            ours = our_logits(directory)
            print(f"\n{name}")
            for dequantize in (False, True):
                route = "dequantize=True" if dequantize else "default route  "
                print(f"  {route}: {try_route(directory, dequantize, ours)}")
            stored = load_file(directory / "model.safetensors").get(f"{MODULE}.weight_zero_point")
            if stored is not None:
                built = built_zero_point_shape(directory)
                print(f"  {MODULE}.weight_zero_point: checkpoint {tuple(stored.shape)}, default route builds {built}")


if __name__ == "__main__":
    main()
