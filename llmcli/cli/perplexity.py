"""`llm perplexity`: parse, call llmcli.tools.perplexity, print one line or JSON.

The torch-heavy library is imported inside the command body so `llm --help` and completion stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llmcli.cli import app
from llmcli.cli.options import DEQUANTIZE, KV_DTYPE, TENSOR_PARALLEL, positive_int
from llmcli.cli.resolve import resolve_model_spec

EXAMPLES = (
    "[bold]Examples[/bold]\n\n  llm perplexity\n  llm perplexity ./model-int4-g64 --file book.txt --window 512 --json"
)


@app.command("perplexity", epilog=EXAMPLES)
def perplexity_cmd(
    model: str | None = typer.Argument(
        None, help="Model directory, .gguf file or store name (default: the built-in model)."
    ),
    file: Path | None = typer.Option(
        None, "--file", help="UTF-8 text to score (default: the GPL-3 text in /usr/share/common-licenses)."
    ),
    window: int = typer.Option(
        512,
        "--window",
        parser=positive_int("--window", 2),
        metavar="INT",
        help="Tokens per window (no overlap), from 2 to the model's context.",
    ),
    max_tokens: int = typer.Option(
        4096,
        "--max-tokens",
        parser=positive_int("--max-tokens", 2),
        metavar="INT",
        help="Score at most this many tokens of the text (>= 2).",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16."),
    dequantize: bool = DEQUANTIZE,
    kv_dtype: str = KV_DTYPE,
    tp: int = TENSOR_PARALLEL,
    as_json: bool = typer.Option(False, "--json", help='Print {"perplexity": ..., "tokens": ...}.'),
) -> None:
    """Measure a model's perplexity on a text file."""
    from llmcli.engine.llm_engine import check_context
    from llmcli.hub.inspect import model_config
    from llmcli.tools.perplexity import DEFAULT_TEXT, measure_perplexity, read_text

    text = read_text(file or DEFAULT_TEXT)
    path = resolve_model_spec(model)
    check_context(model_config(path), window, f"--window {window:,}")  # before the tokenizer and weights load
    r = measure_perplexity(path, text, window, max_tokens, device, dtype, dequantize, tp, kv_dtype)
    if as_json:
        typer.echo(json.dumps({"perplexity": r.perplexity, "tokens": r.tokens}))
    else:
        typer.echo(f"perplexity {r.perplexity:.4f} over {r.tokens} tokens (window {window})")
