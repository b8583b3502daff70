"""`llm chat`: an interactive chat in the terminal (the REPL itself is the llmcli.chat package).

The engine and the REPL are imported inside the command body so `llm --help` and completion stay fast, and so is
the model resolver: it imports `llm pull`'s module, which would otherwise be listed in `llm --help` before this
command.
"""

from __future__ import annotations

import sys

import typer

from llmcli.cli import app
from llmcli.cli.options import (
    COMPILE,
    DEQUANTIZE,
    DEVICE,
    DRAFT,
    DTYPE,
    KV_CACHE_GIB,
    KV_DTYPE,
    MIN_P,
    NUM_DRAFT,
    REPEAT_PENALTY,
    SEED,
    SPECULATE,
    TEMPERATURE,
    TENSOR_PARALLEL,
    TOP_K,
    TOP_P,
    apply_compile,
    make_decoder,
)

EXAMPLES = (
    "[bold]Examples[/bold]\n\n  llm chat\n  llm chat ./Qwen2.5-0.5B-Instruct --system 'Answer briefly.'\n"
    "  llm chat --temperature 0 --speculate ngram\n  echo 'What is the capital of France?' | llm chat"
)


@app.command("chat", epilog=EXAMPLES)
def chat(
    model: str | None = typer.Argument(None, help="Model (directory, .gguf or store name; default: SmolLM2-135M)."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float | None = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    seed: int | None = SEED,
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    dequantize: bool = DEQUANTIZE,
    kv_cache_gib: float | None = KV_CACHE_GIB,
    kv_dtype: str = KV_DTYPE,
    tp: int = TENSOR_PARALLEL,
    compile_mode: str = COMPILE,
    markdown: bool = typer.Option(False, "--markdown", help="Render replies as Markdown (in a terminal)."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history file."),
    draft: str | None = DRAFT,
    speculate: str | None = SPECULATE,
    num_draft: int | None = NUM_DRAFT,
) -> None:
    """Chat with a model in the terminal (pipe messages in, one per line, for scripts)."""
    from rich.console import Console

    from llmcli.chat.backend import EngineBackend
    from llmcli.chat.conversation import DEFAULT_MAX_TOKENS
    from llmcli.chat.session import ChatSession
    from llmcli.chat.terminal import history_path, setup_readline
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.tp import load_engine

    path = resolve_model_spec(model)
    settings = SamplingParams.settle(
        path,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repeat_penalty,
        seed=seed,
        max_tokens=max_tokens,
    )

    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 (a stray keystroke, a binary pipe) arrive as surrogate escapes instead of raising
        # in the middle of the session; the session turns them into U+FFFD (engine.text.valid_text). input() reads
        # its decoding from sys.stdin too.
        sys.stdin.reconfigure(errors="surrogateescape")
    engine = load_engine(path, tp, device, dtype, kv_cache_gib=kv_cache_gib, kv_dtype=kv_dtype, dequantize=dequantize)
    apply_compile(engine, compile_mode)
    spec = make_decoder(
        engine, draft, speculate, num_draft, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, kv_dtype=kv_dtype
    )
    backend = EngineBackend(engine, path.name, streamer=spec, path=path)
    if interactive:
        console = Console(highlight=False)
        session = ChatSession(
            backend, settings, system, console=console, interactive=True, markdown=markdown, model_name=path.name
        )
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
        session = ChatSession(backend, settings, system, console=out, err=err, interactive=False, model_name=path.name)
        session.run_piped(sys.stdin)
