"""transformers' greedy answer from a directory `llm quantize` wrote, to set beside `llm run DIR ... -t 0`.

    .venv/bin/python scripts/transformers_answer.py DIR [--prompt TEXT] [--max-tokens 12]

compressed-tensors asymmetric INT4 loads with CompressedTensorsConfig(dequantize=True) (transformers' default route
rejects its packed zero points: scripts/ct_transformers_routes.py); everything else by the default route (GPTQ
needs optimum and gptqmodel importable). Prints the layer class transformers built, the load and generate times
and the answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import CompressedTensorsConfig


def load_kwargs(directory: Path) -> dict:
    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
    asymmetric = any(w.get("symmetric") is False for w in weights)
    if qc.get("quant_method") == "compressed-tensors" and asymmetric:
        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory", type=Path)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(args.directory)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.directory, dtype=torch.float32, **load_kwargs(args.directory)
    )
    loaded = time.perf_counter() - start
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
    generated = time.perf_counter() - start
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    layer = type(model.model.layers[0].mlp.down_proj)
    print(f"{layer.__module__}.{layer.__name__}, load {loaded:.1f} s, generate {generated:.1f} s: {answer!r}")


if __name__ == "__main__":
    main()
