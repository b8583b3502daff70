"""llm perplexity against transformers computing the same windows on the same model and tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmcli.tools.perplexity import DEFAULT_TEXT, perplexity


def _reference_ppl(model, ids: list[int], window: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), window):
            chunk = torch.tensor([ids[s : s + window]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits[0].float()
            total += F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def test_tiny_model_perplexity_matches_transformers(tiny_model):
    import transformers

    from llmcli.engine.llm_engine import LLMEngine

    src = tiny_model("llama")
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    engine = LLMEngine.load(str(src), device="cpu", dtype="float32", tokenizer=False)
    r = perplexity(engine, ids, window=64, max_tokens=140)
    assert r.tokens == 63 + 63 + 11  # three windows, each scored on all but its first token
    expected = _reference_ppl(ref, ids[:140], 64)
    assert abs(r.perplexity / expected - 1) < 0.005


def test_smollm2_perplexity_matches_transformers(smollm2_gguf):
    """The real model on real English text (the GPL-3 text shipped by base-files)."""
    import transformers

    from llmcli.engine.llm_engine import LLMEngine

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = tok(DEFAULT_TEXT.read_text(), add_special_tokens=False).input_ids[:300]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    expected = _reference_ppl(ref, ids, 128)
    engine = LLMEngine.load(str(smollm2_gguf), device="cpu", dtype="float32", tokenizer=False, dequantize=True)
    r = perplexity(engine, ids, window=128)
    assert r.tokens == 300 - 3
    assert abs(r.perplexity / expected - 1) < 0.005
    assert 2 < r.perplexity < 100  # a working language model on English prose


def test_perplexity_cli_json_and_errors(smollm2_gguf, tmp_path, capsys):
    import json

    import pytest

    from llmcli.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        out, err = capsys.readouterr()
        return e.value.code, out, err

    text = tmp_path / "t.txt"
    text.write_text(DEFAULT_TEXT.read_text()[:2000])
    code, out, _ = run(
        "perplexity", str(smollm2_gguf), "--file", str(text), "--max-tokens", "100", "--window", "50", "--json"
    )
    assert code == 0
    r = json.loads(out)
    assert r["tokens"] == 98 and 1 < r["perplexity"] < 1000
    code, _, err = run("perplexity", str(smollm2_gguf), "--file", str(tmp_path / "missing.txt"))
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1
