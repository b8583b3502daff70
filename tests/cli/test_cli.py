"""The CLI shell: version, help, one-line errors, completions in sync with the app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmcli import __version__
from llmcli.cli import completion

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["pull", "list", "show", "rm", "estimate", "quantize", "run", "chat", "perplexity", "bench", "serve"]


def llm(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, input=input, timeout=300
    )


def test_version():
    r = llm("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llm {__version__}"


def test_help_lists_every_command():
    r = llm("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    r = llm(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


@pytest.mark.parametrize("args", [["nosuchcommand"], ["estimate", "--nosuchflag", "x"]])
def test_usage_errors_are_one_line(args):
    r = llm(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_completions_are_current():
    for name, text in completion.scripts().items():
        committed = (ROOT / "completions" / name).read_text()
        assert committed == text, f"completions/{name} is stale: run `make completions`"
