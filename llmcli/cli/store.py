"""`llm list`, `llm show`, `llm rm`: the models on this machine."""

from __future__ import annotations

import json
import sys
import time

import typer

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.units import format_bytes, format_count


def _params(n: int | None) -> str:
    return format_count(n) if n else "-"


def _ago(t: float) -> str:
    d = max(0.0, time.time() - t)
    for secs, unit in (
        (86400 * 365, "year"),
        (86400 * 30, "month"),
        (86400 * 7, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ):
        if d >= secs:
            n = int(d // secs)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


@app.command("list", epilog="[bold]Examples[/bold]\n\n  llm list\n  llm list --json")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List local models: Hub repos in the HF cache, `llm quantize` output, and the default model."""
    from rich.console import Console
    from rich.table import Table

    from llmcli.hub.store import list_models

    models = list_models()
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "REVISION", "FORMAT", "PARAMS", "SIZE", "MODIFIED"):
        table.add_column(col, justify="right" if col in ("PARAMS", "SIZE") else "left")
    for m in models:
        table.add_row(
            m.name, (m.revision or "-")[:12], m.format, _params(m.params), format_bytes(m.size), _ago(m.modified)
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@app.command("show", epilog="[bold]Examples[/bold]\n\n  llm show\n  llm show Qwen/Qwen2.5-0.5B-Instruct --json")
def show(
    model: str | None = typer.Argument(None, help="Path, name from `llm list`, or ORG/NAME[:REV]."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a model's architecture, size, quantization, chat template, special tokens and files."""
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.hub.inspect import show_model

    info = show_model(resolve_model_spec(model))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    total, active = info["parameters"], info["active_parameters"]
    rows = [
        ("architecture", info["architecture"]),
        ("parameters", _params(total) + (f" ({_params(active)} active)" if active and active != total else "")),
        ("context length", info["context_length"]),
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("heads / kv heads", f"{info['heads']} / {info['kv_heads']}"),
        ("head dim", info["head_dim"]),
        ("vocab", info["vocab_size"]),
    ]
    if info["experts"]:
        rows.append(("experts", f"{info['experts']} ({info['experts_per_token']} per token)"))
    rows += [
        ("format", info["format"]),
        ("quantization", info["quantization"] or "none"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("special tokens", ", ".join(f"{k}={v!r}" for k, v in info["special_tokens"].items()) or "-"),
        ("path", info["path"]),
    ]
    for k, v in rows:
        typer.echo(f"  {k:<17}{v}")
    typer.echo(f"  files ({format_bytes(info['size'])})")
    for f in info["files"]:
        typer.echo(f"    {f['name']:<44}{format_bytes(f['size']):>10}")


@app.command(
    "rm",
    epilog="[bold]Examples[/bold]\n\n  llm rm Qwen/Qwen2.5-0.5B-Instruct\n  llm rm smollm2-135m-instruct-int8 --yes",
)
def rm(
    model: str = typer.Argument(..., help="A name from `llm list` (ORG/NAME removes every revision)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a local model (frees the blobs no other revision uses)."""
    from llmcli.hub.remove import plan_removal

    removal = plan_removal(model)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to delete {removal.description} without confirmation; pass --yes")
        if not typer.confirm(f"delete {removal.description}, freeing {format_bytes(removal.freed)}?", default=False):
            raise UserError("nothing deleted")
    removal.execute()
    typer.echo(f"deleted {removal.description}, freed {format_bytes(removal.freed)}")
