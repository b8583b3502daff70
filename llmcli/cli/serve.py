"""`llm serve`: the OpenAI- and Ollama-compatible HTTP server on one model; prints the banner, then serves.

The server package (FastAPI, uvicorn, the engine, torch) is imported inside the command body so `llm --help` and
completion stay fast; MODEL resolves as `llm run`'s does. With --tp N this process is rank 0 and serves; under
torchrun the other ranks only follow its steps (they open no port).
"""

from __future__ import annotations

import os
import sys

import typer

from llmcli.cli import app
from llmcli.cli.options import (
    COMPILE,
    DEQUANTIZE,
    DEVICE,
    DTYPE,
    KV_CACHE_GIB,
    KV_DTYPE,
    TENSOR_PARALLEL,
    positive_int,
)
from llmcli.errors import UserError

EXAMPLES = (
    "[bold]Examples[/bold]\n\n  llm serve\n"
    "  llm serve ./Qwen2.5-0.5B-Instruct --port 8000 --api-key secret\n"
    "  llm serve ./Qwen2.5-7B-Instruct --device cuda --tp 2\n"
    "  OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=none python my_client.py\n"
    "  OLLAMA_HOST=127.0.0.1:8080 ollama run SmolLM2-135M-Instruct.Q4_1"
)


def _model_name(path) -> str:
    """What clients name the model: the GGUF file's stem or the model directory's name."""
    return path.stem if path.is_file() else path.name


def _banner(url: str, name: str, path, device: str, limits, api_key: str | None) -> None:
    lines = [
        f"llm serve: {url}  (OpenAI: {url}/v1, Ollama: OLLAMA_HOST={url.removeprefix('http://')})",
        f"  model   {name}  ({path})",
        f"  device  {device}",
        f"  limits  {limits.max_num_seqs} running sequences, {limits.max_num_batched_tokens} batched tokens "
        f"per step, {limits.max_queue} waiting requests",
        f"  auth    {'API key required (Authorization: Bearer ...)' if api_key else 'none'}",
        "  loading the model in the background (GET /health answers 503 until it is ready); Ctrl-C stops",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _follow(path, load) -> None:
    """A torchrun rank other than 0: load this rank's share and run rank 0's steps until it stops (no server)."""
    from llmcli.engine.tp import load_engine

    # what this rank loads comes from rank 0's load command; these arguments only have to pass the same checks
    load_engine(path, load.tensor_parallel, load.device, load.dtype, tokenizer=False)


@app.command("serve", epilog=EXAMPLES)
def serve(
    model: str | None = typer.Argument(
        None, metavar="[MODEL]", help="Model (directory, .gguf or store name); default: the built-in."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", "-p", min=1, max=65535, help="TCP port (llama.cpp's default)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="LLM_API_KEY", help="Require this key (Authorization: Bearer) on the API routes."
    ),
    max_num_seqs: int = typer.Option(
        16,
        "--max-num-seqs",
        parser=positive_int("--max-num-seqs"),
        metavar="INT",
        help="Most sequences decoded together.",
    ),
    max_num_batched_tokens: int = typer.Option(
        512,
        "--max-num-batched-tokens",
        parser=positive_int("--max-num-batched-tokens"),
        metavar="INT",
        help="Most tokens (prefill chunks + decodes) in one step.",
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", parser=positive_int("--max-queue", 0), metavar="INT", help="Waiting requests before 503."
    ),
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    dequantize: bool = DEQUANTIZE,
    kv_cache_gib: float | None = KV_CACHE_GIB,
    kv_dtype: str = KV_DTYPE,
    tp: int = TENSOR_PARALLEL,
    compile_mode: str = COMPILE,
) -> None:
    """Serve a model over HTTP: the OpenAI API (/v1) and Ollama's (/api), /health and /metrics."""
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.engine import tp as tensor_parallel
    from llmcli.engine.llm_engine import resolve_device
    from llmcli.serve.model import EngineLimits, LoadOptions, ServedModel
    from llmcli.serve.server import run_server

    path = resolve_model_spec(model)
    where = str(resolve_device(device))  # a bad --device is refused here, before the server starts
    limits = EngineLimits(max_num_seqs, max_num_batched_tokens, max_queue)
    load = LoadOptions(device, dtype, kv_cache_gib, dequantize, kv_dtype, tp, compile_mode)
    if tp > 1:
        tensor_parallel.check_split(path, tp)  # heads that cannot be split: refused before the server starts
        if tensor_parallel.torchrun_follower():
            _follow(path, load)
            return
        where += f", {tp} tensor-parallel ranks"
    served = ServedModel(path, _model_name(path), load, limits)
    api_key = api_key or os.environ.get("LLM_API_KEY") or None
    url_host = f"[{host}]" if ":" in host else host
    _banner(f"http://{url_host}:{port}", served.name, path, where, limits, api_key)
    run_server(served, host, port, api_key)
    if served.error:
        raise UserError(f"loading {path} failed: {served.error}")
