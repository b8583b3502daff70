"""The `llm` command line: a thin typer app.

Each command lives in its own module under llmcli/cli/ and only parses, calls one library
function and renders. Heavy imports (torch, transformers-free engine, huggingface_hub) happen
inside the command bodies so `llm --help` and shell completion stay fast.
"""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer

from llmcli import __version__
from llmcli.errors import UserError

app = typer.Typer(
    name="llm",
    help="Run, convert and size large language models on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Run, convert and size large language models on your own machine."""
    if debug:
        os.environ["LLMCLI_DEBUG"] = "1"


# Commands register themselves on `app`, and `llm --help` lists them in import order (so: not sorted).
# isort: off
from llmcli.cli import run as _run  # noqa: E402,F401
from llmcli.cli import bench as _bench  # noqa: E402,F401
from llmcli.cli import chat as _chat  # noqa: E402,F401
from llmcli.cli import estimate as _estimate  # noqa: E402,F401
from llmcli.cli import pull as _pull  # noqa: E402,F401
from llmcli.cli import quantize as _quantize  # noqa: E402,F401
from llmcli.cli import perplexity as _perplexity  # noqa: E402,F401
from llmcli.cli import serve as _serve  # noqa: E402,F401
from llmcli.cli import store as _store  # noqa: E402,F401
# isort: on


def _click_classes(name: str) -> tuple[type, ...]:
    """Exception classes of that name from click and from the copy of click that newer typer vendors."""
    mods = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        mods.append(vendored)
    except ImportError:
        pass
    return tuple(getattr(m, name) for m in mods if hasattr(m, name))


_EXIT, _NO_ARGS, _CLICK_ERROR, _ABORT = (
    _click_classes(n) for n in ("Exit", "NoArgsIsHelpError", "ClickException", "Abort")
)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure a user can cause ends as one `error:` line."""
    debug = "--debug" in (argv if argv is not None else sys.argv) or os.environ.get("LLMCLI_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="llm", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _NO_ARGS as e:  # `llm` alone: help, success
        e.show()
        sys.exit(0)
    except _CLICK_ERROR as e:  # bad flag, bad value, missing argument
        cmd = f"llm {e.ctx.info_name} --help" if getattr(e, "ctx", None) and e.ctx.parent else "llm --help"
        _fail(f"{e.format_message()} (see '{cmd}')", e.exit_code)
    except (KeyboardInterrupt, *_ABORT):
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except BrokenPipeError:  # `llm run ... | head`
        sys.exit(0)
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
