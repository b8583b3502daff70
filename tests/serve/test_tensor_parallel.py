"""`llm serve --tp 2`: the engine thread drives rank 0 of two gloo ranks. A random fp32 llama (4 query / 2 KV heads,
so each rank holds half) answers the official `openai` client with exactly the greedy text one process generates,
several requests batched together; SIGINT, SIGTERM or SIGKILL of the server leaves no worker behind."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from conftest import random_ids, write_byte_tokenizer
from serve_server import descendants, free_port, gone, start_server

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams

PROMPTS = [random_ids(n, seed) for n, seed in [(5, 0), (17, 1), (9, 2), (30, 3)]]
MAX_TOKENS = 12
FLAGS = ("--tp", "2", "--dtype", "float32", "--max-num-seqs", "4")


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    """The session's tiny llama with a byte-level tokenizer (the server needs one), in a copy of its own."""
    d = tmp_path_factory.mktemp("tp-serve") / "tiny-llama"
    shutil.copytree(tiny_model("llama"), d)
    write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    served = start_server(model_dir, tmp_path_factory.mktemp("tp-serve-log") / "server.log", *FLAGS)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def expected(model_dir) -> list[str]:
    """One process's greedy text for each prompt: its tokens decoded without the end-of-sequence ids, as the
    server's replies drop them."""
    engine = LLMEngine.load(model_dir, "cpu", torch.float32)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    return [engine.tokenizer.decode([t for t in out if t not in engine.eos_token_ids]) for out in outs]


def test_greedy_text_matches_one_process(server, model_dir, expected):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    args = dict(model=model_dir.name, temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **args).choices[0].text for p in PROMPTS]
    assert alone == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=PROMPTS[1], stream=True, **args))
    assert streamed == expected[1]
    assert "2 tensor-parallel ranks" in server.text_log()


def test_concurrent_requests_batch_on_both_ranks(server, model_dir, expected):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    args = dict(model=model_dir.name, temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})

    async def run():
        rs = await asyncio.gather(*(aclient.completions.create(prompt=p, **args) for p in PROMPTS * 2))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run()) == expected * 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_the_server_leaves_no_worker(sig, model_dir, tmp_path):
    """A stream in flight when the signal comes: SIGINT / SIGTERM end the request, stop the worker and exit 0;
    after SIGKILL the worker notices its parent is gone. Either way nothing of the server is left."""
    served = start_server(model_dir, tmp_path / "server.log", *FLAGS)
    try:
        children = descendants(served.proc.pid)
        assert len(children) >= 1  # the rank-1 worker (and multiprocessing's resource tracker)
        body = {"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            served.proc.send_signal(sig)
            try:
                code = served.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"llm serve --tp 2 did not exit within 30 s of {sig.name}")
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), served.text_log()[-2000:]
        assert gone(children, timeout=15), f"left running after {sig.name}: {[p for p in children if not gone([p])]}"
        if sig != signal.SIGKILL:
            assert "Traceback" not in served.text_log()
    finally:
        served.stop()


def test_heads_that_cannot_be_split_are_refused_before_serving(model_dir):
    """2 KV heads cannot be shared by 3 ranks: one line and exit 1, before any port or worker."""
    cmd = [sys.executable, "-m", "llmcli", "serve", str(model_dir), "--tp", "3", "--port", str(free_port())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cannot be shared by 3 ranks" in r.stderr
