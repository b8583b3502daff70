"""The one place the CLI turns a MODEL argument into a local path, offering `llm pull` on a terminal.

The library resolver never prompts: it raises NotDownloaded for a Hub repo that is not in the cache.
Here, when stdin is a terminal, the user is asked whether to pull it; otherwise (or on "no") the error
stands, with its `llm pull` command. The resolver (which reads GGUF and config files) is imported inside
the function, as the command bodies do, so `llm --help` and completion stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmcli.cli.pull import pull_model
from llmcli.errors import NotDownloaded


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_model_spec(spec: str | None) -> Path:
    """A model directory or .gguf file for `spec` (None: the embedded default), see hub.resolve.resolve_model."""
    from llmcli.hub.resolve import resolve_model

    try:
        return resolve_model(spec, notify=_to_stderr)
    except NotDownloaded as e:
        if not sys.stdin.isatty() or not typer.confirm(
            f"{e.spec} is not downloaded. Pull it now?", default=True, err=True
        ):
            raise
        return pull_model(e.spec)
