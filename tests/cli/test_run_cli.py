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


def test_run_max_tokens_0_with_speculation_prints_the_stats_line(smollm2_gguf):
    r = llm("run", str(smollm2_gguf), "Hi", "-n", "0", "--speculate", "ngram")  # nothing generated: no summary
    assert r.returncode == 0, r.stderr
    assert "0 tokens at" in r.stderr and "speculative:" not in r.stderr and "error" not in r.stderr


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


# ---- undecodable input, the context, Ctrl-C (issue 14) --------------------------------------------------------------


def llm_bytes(*args, input: bytes | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "llmcli", *args], capture_output=True, input=input, timeout=600, env=env, **kw
    )


BAD = b"Say: a\xffb \xed\xa0\x80 caf\xc3 \xe2\x82 ok " + bytes(range(1, 256))  # stray, surrogate, cut-off bytes


def _json_run(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_run_undecodable_bytes_through_stdin_and_argv(smollm2_gguf):
    """Invalid UTF-8 on stdin (a binary file) and in argv is replaced with U+FFFD, with one warning line: the same
    prompt and reply as the text Python's own decode(errors="replace") gives."""
    args = ("run", str(smollm2_gguf), "--temperature", "0", "-n", "4", "--json")
    ref = _json_run(llm_bytes(*args[:2], "-", *args[2:], input=BAD.decode("utf-8", errors="replace").encode()))
    piped = llm_bytes(*args[:2], "-", *args[2:], input=BAD)
    argv = llm_bytes(*args[:2], BAD, *args[2:])  # bytes in argv: Python hands them over as surrogate escapes
    for r in (piped, argv):
        out = _json_run(r)
        assert (out["prompt_tokens"], out["text"]) == (ref["prompt_tokens"], ref["text"])
        (line,) = r.stderr.decode().strip().splitlines()[:1]
        assert line.startswith("warning: the prompt is not valid UTF-8")


def test_run_prompt_past_the_context_is_refused_with_the_numbers(smollm2_gguf):
    import gguf

    field = gguf.GGUFReader(str(smollm2_gguf)).fields["llama.context_length"]
    context = int(field.parts[field.data[0]][0])  # 8192, read by gguf's own reader
    r = llm("run", str(smollm2_gguf), "-", "-n", "4", input="hello " * 20_000)
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: the prompt is ") and f"the context holds {context:,} tokens" in line
    assert int(line.split("the prompt is ")[1].split(" ")[0].replace(",", "")) > 20_000


def test_run_stops_at_a_small_kv_cache_with_finish_reason_length(smollm2_gguf):
    """--kv-cache-gib smaller than the model's context: the reply stops where the cache ends (said up front)."""
    from llmcli.estimate import kv_bytes_per_token
    from llmcli.hub.inspect import model_config

    gib = 0.004
    per_block = kv_bytes_per_token(model_config(smollm2_gguf), 4) * 16  # float32 on CPU, 16-token blocks
    pool = int(gib * 2**30 // per_block) * 16
    r = llm("run", str(smollm2_gguf), "Count to 500.", "--kv-cache-gib", str(gib), "-n", "1000", "--ignore-eos",
            "--temperature", "0", "--json")  # fmt: skip
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] + out["generated_tokens"] == pool and out["finish_reason"] == "length"
    assert f"the reply stops at {pool - out['prompt_tokens']} tokens" in r.stderr


def _interrupt(args: tuple[str, ...], wait_for) -> tuple[int, str, str, float]:
    """Start `llm ARGS`, call wait_for(proc) (it returns once generation runs), SIGINT, collect. Also returns how
    long wait_for took after the context note appeared on stderr."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "llmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)  # fmt: skip
    try:
        note = p.stderr.readline().decode()  # printed after loading, right before the prompt is processed
        assert note.startswith("note: "), note
        t0 = time.monotonic()
        head = wait_for(p)
        waited = time.monotonic() - t0
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    return p.returncode, head + out.decode(), err.decode(), waited


LONG = ("Tell me a very long story.", "-n", "9000", "--ignore-eos", "--temperature", "0")  # past the context


def test_ctrl_c_keeps_the_reply_and_prints_json_of_it(smollm2_gguf):
    """Plain: what was printed stays, "interrupted" on stderr, exit 130. --json: the JSON of the tokens generated
    so far, finish_reason "interrupted", exit 130. A real SIGINT once tokens come out."""
    code, out, err, first = _interrupt(("run", str(smollm2_gguf), *LONG), lambda p: p.stdout.read(8).decode())
    assert code == 130 and "Traceback" not in err
    n = int(err.strip().splitlines()[-1].split("interrupted after ")[1].split()[0])
    assert len(out) >= 8 and out.endswith("\n") and n >= 1

    def wait(p) -> str:  # --json prints nothing until the end: wait well past when the plain run's tokens began
        import time

        time.sleep(3 * first + 5)
        return ""

    code, out, err, _ = _interrupt(("run", str(smollm2_gguf), *LONG, "--json"), wait)
    assert code == 130 and "Traceback" not in err
    j = json.loads(out)
    assert j["finish_reason"] == "interrupted" and 0 < j["generated_tokens"] < 9000
    assert err.strip().splitlines()[-1] == f"interrupted after {j['generated_tokens']} generated token(s)"
    assert j["text"] and out.count("\n") == 1


def test_sampling_edge_values_through_the_cli(smollm2_gguf):
    """What the help allows does what it says: --top-p 1e-9 and a tiny temperature are greedy, the largest seed
    reproduces; one past each edge is refused by the parser (exit 2, one line)."""
    from llmcli.engine.sampling_params import MAX_SEED

    base = ("run", str(smollm2_gguf), "Tell me a story.", "-n", "8", "--ignore-eos", "--json")

    def text(*extra: str) -> str:
        r = llm(*base, *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["text"]

    greedy = text("--temperature", "0")
    assert text("--temperature", "1", "--top-p", "1e-9", "--seed", "3") == greedy
    assert text("--temperature", "1e-40", "--seed", "3") == greedy
    top = ("--temperature", "1.5", "--seed", str(MAX_SEED))
    assert text(*top) == text(*top)
    for flag, value in [("--top-p", "0"), ("--repeat-penalty", "0"), ("--seed", str(MAX_SEED + 1)),
                        ("--min-p", "1.5"), ("--temperature", "nan"), ("--top-k", "-1")]:  # fmt: skip
        r = llm(*base, flag, value)
        assert r.returncode == 2 and r.stdout == "", (flag, r.stderr)
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("error: Invalid value for") and flag in line and f"'{value}' is not" in line
