"""`llm chat`: an interactive chat in the terminal (the REPL itself lives in llmcli/chat.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from llmcli.cli import app
from llmcli.cli.run import (DEQUANTIZE_HELP, DEVICE_HELP, DTYPE_HELP, MIN_P, REPEAT_PENALTY, SEED, TEMPERATURE, TOP_K,
                             TOP_P)


@app.command("chat", epilog="[bold]Examples[/bold]\n\n  llm chat\n  llm chat ./Qwen2.5-0.5B-Instruct --system 'Answer briefly.'\n  llm chat --temperature 0 --speculate ngram\n  echo 'What is the capital of France?' | llm chat")
def chat(
    model: Optional[str] = typer.Argument(None, help="Model (directory, .gguf or store name; default: SmolLM2-135M)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: Optional[float] = TEMPERATURE,
    top_k: Optional[int] = TOP_K,
    top_p: Optional[float] = TOP_P,
    min_p: Optional[float] = MIN_P,
    repeat_penalty: Optional[float] = REPEAT_PENALTY,
    seed: Optional[int] = SEED,
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    dequantize: bool = typer.Option(False, "--dequantize", help=DEQUANTIZE_HELP),
    kv_cache_gib: Optional[float] = typer.Option(None, "--kv-cache-gib", help="KV-cache size (default: CPU 1 GiB, CUDA most free memory)."),
    markdown: bool = typer.Option(False, "--markdown", help="Render replies as Markdown (in a terminal)."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history file."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model for speculative decoding (same tokenizer)."),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="`ngram`: draft by looking up the context."),
    num_draft: Optional[int] = typer.Option(None, "--num-draft", help="Tokens drafted per step (4 draft, 8 ngram)."),
) -> None:
    """Chat with a model in the terminal (pipe messages in, one per line, for scripts)."""
    from rich.console import Console

    from llmcli.chat import ChatSession, EngineBackend, history_path, sampling_settings, setup_readline
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.cli.resolve import resolve_model_spec

    path = resolve_model_spec(model)
    settings = sampling_settings(path, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens)

    interactive = sys.stdin.isatty()
    engine = LLMEngine.load(path, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, dequantize=dequantize)
    from llmcli.engine.speculative import make_decoder

    spec = make_decoder(engine, draft, speculate, num_draft, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib)
    backend = EngineBackend(engine, path.name, streamer=spec)
    if interactive:
        console = Console(highlight=False)
        session = ChatSession(backend, settings, system, console=console, interactive=True, markdown=markdown,
                              model_name=path.name)
        save_history = setup_readline(None if no_history else history_path())
        session.banner()
        try:
            session.run_interactive()
        finally:
            save_history()
    else:
        # Scripts: plain replies on stdout, no banner, no colour; notices go to stderr.
        out = Console(color_system=None, highlight=False, soft_wrap=True)
        err = Console(file=sys.stderr, color_system=None, highlight=False, soft_wrap=True)
        session = ChatSession(backend, settings, system, console=out, err=err, interactive=False,
                              model_name=path.name)
        session.run_piped(sys.stdin)
