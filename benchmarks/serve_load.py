"""Load on `llm serve` (and, side by side, llama-cpp-python's server on the same GGUF): throughput and latency.

usage: python benchmarks/serve_load.py [MODEL.gguf] [--target ours|llama-cpp|both] [--concurrency 1,4,16,64]
            [--rate 2.0] [--long-prompt] [--num-requests N] [--max-tokens 64] [--prompt-words 48] [--url URL]

Every request is a streamed POST /v1/completions (the same random-word prompts for every target, temperature 0,
max_tokens, EOS off: `ignore_eos` for ours, a -100 logit_bias on the end-of-sequence ids for llama.cpp, each server
ignoring the field it does not know). Latencies follow vLLM's benchmark_serving definitions:
  TTFT  send -> first streamed token;      TPOT  (end-to-end - TTFT) / (output tokens - 1), per request;
  ITL   the gap between consecutive streamed tokens (all gaps of all requests pooled);
  throughput: completed requests / wall time, output tokens / wall time. One streamed chunk counts as one token
  (both servers send one chunk per token; ours holds back a chunk only inside a multi-byte character).
Loads: fixed concurrency (C clients, each sending its next request when the last one ends; N requests per level,
default 2*C, at least 8), Poisson arrivals at --rate requests/s (N requests), and --long-prompt: 8 streams run, then a
2,000-token prompt arrives; the table reports the running streams' ITL median and p99 while it is admitted (from its
send to its first token) and before, so a prefill that stalls decoding shows up as a large p99/median (the goal's
ratio is the last: p99 while it is admitted over the median before it).

--target ours starts `llm serve MODEL` on a free port, llama-cpp starts
`$LLAMA_CPP_PYTHON -m llama_cpp.server --model MODEL --n_threads 2 --n_ctx 4096 --interrupt_requests False`
(a new request must not cancel the running one), both one after the other (never at once: they would share the
cores); --url measures an already running OpenAI-compatible server instead. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# the Python of a side venv with llama-cpp-python[server] (its own fastapi/uvicorn pins stay out of ours)
LCPP_PYTHON = os.environ.get("LLAMA_CPP_PYTHON", "python3")
HEADER = "| target | load | completed | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms |"
WORDS = (
    "river mountain quiet table green window music paper garden silver morning letter bridge candle forest "
    "harbor violin winter meadow lantern stone cloud ocean pencil orchard thunder valley marble feather"
).split()


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # arrival time of each token (perf_counter)
    ok: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


class Target:
    """One server under test: started (or given by --url), its model name, and the request body it gets."""

    def __init__(self, kind: str, model: Path | None, url: str | None, eos_ids: list[int]):
        self.kind, self.model, self.url, self.eos_ids = kind, model, url, eos_ids
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.url:
            return self._wait()
        port = free_port()
        if self.kind == "ours":
            cmd = [sys.executable, "-m", "llmcli", "serve", str(self.model), "--port", str(port)]
        else:
            cmd = [
                LCPP_PYTHON,
                "-m",
                "llama_cpp.server",
                "--model",
                str(self.model),
                "--n_threads",
                "2",
                "--n_ctx",
                "4096",
                "--interrupt_requests",
                "False",
                "--port",
                str(port),
            ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self._wait()

    def _wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/v1/models", timeout=5)
                if r.status_code == 200 and (self.kind != "ours" or httpx.get(self.url + "/health").status_code == 200):
                    self.name = r.json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.kind}: the server at {self.url} did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def body(self, prompt: str, max_tokens: int) -> dict:
        return {
            "model": self.name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "logit_bias": {str(i): -100 for i in self.eos_ids},
        }


async def one(
    client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int, res: Result | None = None
) -> Result:
    res, t0 = res or Result(), time.perf_counter()
    last = None
    async with client.stream("POST", target.url + "/v1/completions", json=target.body(prompt, max_tokens)) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft = now - t0
            else:
                res.gaps.append(now - last)
            res.stamps.append(now)
            last, res.tokens = now, res.tokens + 1
        res.ok = r.status_code == 200 and res.tokens > 0
    res.e2e = time.perf_counter() - t0
    return res


async def fixed(target: Target, concurrency: int, n: int, max_tokens: int, words: int) -> tuple[list[Result], float]:
    todo = list(enumerate(prompts(n, words)))
    out: list[Result] = []

    async def worker(client):
        while todo:
            _, p = todo.pop(0)
            out.append(await one(client, target, p, max_tokens))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return out, time.perf_counter() - t0


async def poisson(target: Target, rate: float, n: int, max_tokens: int, words: int) -> tuple[list[Result], float]:
    rng = random.Random(1)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=n + 4)) as c:
        tasks = []
        for p in prompts(n, words):
            tasks.append(asyncio.create_task(one(c, target, p, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        out = await asyncio.gather(*tasks)
    return list(out), time.perf_counter() - t0


async def long_prompt(target: Target, max_tokens: int, words: int) -> tuple[list[Result], float, dict]:
    """8 running streams; once each has streamed a few tokens, a ~2,000-token prompt arrives."""
    long_text = " ".join(prompts(1, 1500, seed=7))  # ~2,000 tokens for BPE vocabularies of English words
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as c:
        running, streams = [Result() for _ in range(8)], []
        for p, r in zip(prompts(8, words), running):
            streams.append(asyncio.create_task(one(c, target, p, max_tokens * 3, r)))
        # until every stream decodes, or (llama.cpp's server runs one request at a time) one does and 3 s passed
        while not all(len(r.stamps) >= 3 for r in running):
            if any(len(r.stamps) >= 3 for r in running) and time.perf_counter() - t0 > 3:
                break
            await asyncio.sleep(0.05)
        sent = time.perf_counter()
        big = await one(c, target, long_text, 8)
        admitted = sent + big.ttft
        out = await asyncio.gather(*streams)
    during = [b - a for r in out for a, b in zip(r.stamps, r.stamps[1:]) if b >= sent and a <= admitted]
    before = [b - a for r in out for a, b in zip(r.stamps, r.stamps[1:]) if b < sent]
    extra = {"long TTFT": big.ttft, "ITL before": before, "ITL while admitting": during}
    return list(out) + [big], time.perf_counter() - t0, extra


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def row(target: str, load: str, results: list[Result], wall: float) -> str:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [g for r in ok for g in r.gaps]
    toks = sum(r.tokens for r in ok)
    ms = lambda xs, q: f"{pct(xs, q) * 1000:.0f}"  # noqa: E731
    return (
        f"| {target} | {load} | {len(ok)}/{len(results)} | {len(ok) / wall:.2f} | {toks / wall:.1f} | "
        f"{ms(ttft, 50)} / {ms(ttft, 99)} | {ms(tpot, 50)} / {ms(tpot, 99)} | {ms(itl, 50)} / {ms(itl, 99)} |"
    )


def measure(target: Target, args) -> list[str]:
    rows = []
    for c in args.concurrency:
        n = args.num_requests or max(8, 2 * c)
        out, wall = asyncio.run(fixed(target, c, n, args.max_tokens, args.prompt_words))
        rows.append(row(target.kind, f"{c} streams", out, wall))
    if args.rate:
        n = args.num_requests or 16
        out, wall = asyncio.run(poisson(target, args.rate, n, args.max_tokens, args.prompt_words))
        rows.append(row(target.kind, f"Poisson {args.rate}/s", out, wall))
    if args.long_prompt:
        out, wall, x = asyncio.run(long_prompt(target, args.max_tokens, args.prompt_words))
        rows.append(row(target.kind, "8 streams + 2k prompt", out, wall))
        before, during = x["ITL before"], x["ITL while admitting"]
        ratio = lambda xs: pct(xs, 99) / statistics.median(xs) if xs else float("nan")  # noqa: E731
        rows.append(
            f"| {target.kind} | running streams' ITL p99/median | before {ratio(before):.1f} "
            f"({pct(before, 50) * 1000:.0f}/{pct(before, 99) * 1000:.0f} ms) | while the 2k prompt is admitted "
            f"{ratio(during):.1f} ({pct(during, 50) * 1000:.0f}/{pct(during, 99) * 1000:.0f} ms) | "
            f"2k-prompt TTFT {x['long TTFT'] * 1000:.0f} ms | p99 while admitted / median before "
            f"{pct(during, 99) / statistics.median(before) if before and during else float('nan'):.1f} | | |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the built-in SmolLM2)")
    ap.add_argument("--target", choices=["ours", "llama-cpp", "both"], default="ours")
    ap.add_argument("--url", help="an already running server to measure instead of starting one")
    ap.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: off)")
    ap.add_argument("--long-prompt", action="store_true")
    ap.add_argument("--num-requests", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48)
    args = ap.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        from llmcli.hub.default_model import default_model_path

        model = default_model_path(fetch=True)
    from llmcli.tokenizer import load_tokenizer

    eos = sorted(load_tokenizer(model).eos_token_ids)
    kinds = ["ours", "llama-cpp"] if args.target == "both" else [args.target]
    if "llama-cpp" in kinds and not args.url and not shutil.which(LCPP_PYTHON):
        raise SystemExit("--target llama-cpp needs LLAMA_CPP_PYTHON: a venv's python with llama-cpp-python[server]")
    print(
        f"model {model.name}, max_tokens {args.max_tokens}, prompts of {args.prompt_words} words, {os.cpu_count()} "
        f"CPUs\n"
    )
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        target = Target(kind, model, args.url, eos)
        target.start()
        try:
            for line in measure(target, args):
                print(line, flush=True)
        finally:
            target.stop()


if __name__ == "__main__":
    main()
