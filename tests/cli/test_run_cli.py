"""`llm run` and `llm bench` end to end, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

QUESTION = "What is the capital of France?"


def llm(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, input=input, timeout=600, env=env
    )


def test_run_default_model_answers_paris(smollm2_gguf):
    r = llm("run", "--temperature", "0", QUESTION)  # one positional: the prompt, default model
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "Paris" not in r.stderr  # stats go to stderr only
    assert r.stdout.endswith("\n") and "<|im_end|>" not in r.stdout

    # same model named explicitly, prompt from stdin, JSON: the same text and sane counts
    j = llm("run", str(smollm2_gguf), "-", "--temperature", "0", "--json", input=QUESTION)
    assert j.returncode == 0, j.stderr
    out = json.loads(j.stdout)
    assert out["text"] == r.stdout.rstrip("\n")
    assert out["finish_reason"] == "stop"
    assert 0 < out["generated_tokens"] < 64 and out["prompt_tokens"] > 10
    assert out["ttft_s"] > 0 and out["decode_tok_s"] > 0


def test_run_seed_reproducible_and_max_tokens(smollm2_gguf):
    args = (
        "run",
        str(smollm2_gguf),
        "Tell me a story.",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    )
    a, b = llm(*args), llm(*args)
    assert a.returncode == 0, a.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["text"] == jb["text"]
    assert ja["generated_tokens"] == 12 and ja["finish_reason"] == "length"


def test_run_takes_sampling_defaults_from_generation_config(smollm2_gguf, tmp_path):
    """A model directory's generation_config.json sets the defaults (as in `llm chat`); flags still win."""
    from transformers import GenerationConfig

    d = tmp_path / "int8"
    q = llm("quantize", str(smollm2_gguf), "--bits", "8", "-o", str(d))
    assert q.returncode == 0, q.stderr
    args = ("run", str(d), "Tell me a story.", "--seed", "7", "--max-tokens", "24", "--ignore-eos", "--json")

    def text(*extra: str) -> str:
        r = llm(*args, *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["text"]

    sampled, greedy = text(), text("--temperature", "0")  # no generation_config: llama.cpp's 0.8
    assert sampled != greedy
    GenerationConfig(do_sample=True, top_k=1).save_pretrained(d)  # only the likeliest token survives
    assert text() == greedy
    assert text("--top-k", "40") == sampled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_run_cuda_without_gpu_is_one_line_error():
    r = llm("run", "--device", "cuda", "hello")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "CUDA" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (("run", "--dtype", "float64", "hi"), "dtype"),
        (("run", "/nonexistent/model", "hi"), "not found"),
        (("run", ""), "empty"),
        (("bench", "--compare", "vllm"), "transformers"),
    ],
)
def test_user_errors_are_one_line(args, needle):
    r = llm(*args)
    assert r.returncode != 0
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and needle in r.stderr


def test_bench_compare_transformers_json(tiny_model):
    r = llm(
        "bench",
        str(tiny_model("llama")),
        "--prompt-len",
        "12",
        "--gen-len",
        "6",
        "--batch",
        "2",
        "--compare",
        "transformers",
        "--rounds",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ours, theirs = out["results"]
    assert ours["engine"] == "llmcli" and theirs["engine"] == "transformers"
    for res in (ours, theirs):
        assert res["batch"] == 2 and res["prompt_len"] == 12 and res["gen_len"] == 6
        assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["ttft_s"] > 0
    assert out["decode_speedup"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"])
    assert ours["peak_memory_gib"] > 0


def test_bench_table(tiny_model):
    r = llm("bench", str(tiny_model("qwen3")), "--prompt-len", "8", "--gen-len", "4")
    assert r.returncode == 0, r.stderr
    assert "prefill tok/s" in r.stdout and "decode tok/s" in r.stdout and "llmcli" in r.stdout
