"""Arguments are checked before the expensive part: each case points at a model whose weights cannot load (a
directory with config.json only), so any error other than the argument's own means the model was loaded first."""

from __future__ import annotations

import json
import shutil

import pytest

from llmcli.cli import main


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # what fixtures printed while building models
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def no_weights(tiny_model, tmp_path_factory):
    """The tiny llama's config.json (context 512) without its safetensors."""
    d = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model("llama") / "config.json", d / "config.json")
    return d


def test_the_fixture_really_cannot_load(no_weights, capsys):
    code, _, err = _run(capsys, "bench", str(no_weights), "--prompt-len", "8", "--gen-len", "4")
    assert code == 1 and err.startswith("error: ") and "context" not in err, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
@pytest.mark.parametrize("command", ["run", "bench", "chat"])
def test_kv_cache_gib_must_be_positive(no_weights, capsys, command, value):
    args = [command, str(no_weights)] + (["hi"] if command == "run" else [])
    code, out, err = _run(capsys, *args, "--kv-cache-gib", value)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "--kv-cache-gib" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flag", "value"), [("--window", "0"), ("--window", "1"), ("--max-tokens", "1")])
def test_perplexity_window_and_max_tokens_refused_by_the_parser(no_weights, capsys, flag, value):
    code, _, err = _run(capsys, "perplexity", str(no_weights), flag, value)
    assert code == 2 and f"{flag} must be an integer >= 2" in err and len(err.strip().splitlines()) == 1


def test_perplexity_window_past_the_context(no_weights, capsys):
    code, _, err = _run(capsys, "perplexity", str(no_weights), "--window", "513")
    assert code == 1 and err.strip() == "error: --window 513 is past the model's context of 512 tokens"
    assert _run(capsys, "perplexity", str(no_weights), "--window", "512")[0] == 1  # allowed: then the load fails
    assert "context" not in capsys.readouterr().err


def test_bench_prompt_and_gen_past_the_context(no_weights, capsys):
    code, _, err = _run(capsys, "bench", str(no_weights), "--prompt-len", "500", "--gen-len", "13")
    assert code == 1 and "500 + --gen-len 13 = 513 tokens is past the model's context of 512 tokens" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_batch_past_the_kv_cache(tiny_model, capsys, one_thread):
    """Known only once loaded, but before any warm-up: the numbers, not an OutOfBlocks from mid-decode."""
    from llmcli.engine.llm_engine import LLMEngine

    path = tiny_model("llama", num_hidden_layers=2)
    pool = LLMEngine.load(path, device="cpu", kv_cache_gib=0.0002, tokenizer=False).pool_tokens
    assert pool < 512  # smaller than the model's context
    code, _, err = _run(capsys, "bench", str(path), "--kv-cache-gib", "0.0002", "--prompt-len", str(pool - 8),
                        "--gen-len", "16")  # fmt: skip
    assert code == 1 and f"past the context of {pool} tokens" in err
    per_seq = pool // 2
    code, _, err = _run(capsys, "bench", str(path), "--kv-cache-gib", "0.0002", "--prompt-len", str(per_seq - 4),
                        "--gen-len", "4", "--batch", "3", "--rounds", "1")  # fmt: skip
    assert code == 1 and "--batch 3 sequences" in err and f"it holds {pool}" in err, err
    code, out, err = _run(capsys, "bench", str(path), "--kv-cache-gib", "0.0002", "--prompt-len", str(per_seq - 4),
                          "--gen-len", "4", "--batch", "2", "--rounds", "1", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["results"][0]["decode_tok_s"] > 0


@pytest.mark.parametrize("command", ["run", "bench", "chat", "perplexity", "serve"])
def test_kv_dtype_is_checked_by_the_parser(no_weights, capsys, command):
    args = [command, str(no_weights)] + (["hi"] if command == "run" else [])
    code, out, err = _run(capsys, *args, "--kv-dtype", "int4")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "--kv-dtype" in err and "int8" in err and len(err.strip().splitlines()) == 1
