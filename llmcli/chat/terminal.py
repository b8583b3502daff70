"""Terminal input for the chat: reading a (multi-line) message, line editing and history, Ctrl-C as a flag."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmcli.paths import llmcli_home

HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000


def read_message(read: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, or every line between `\"\"\"` markers (Ollama's multi-line input).

    `read(prompt)` returns a line and raises EOFError at the end of input (Ctrl-D) or KeyboardInterrupt.
    """
    line = read(prompt)
    start = line.lstrip()
    if not start.startswith('"""'):
        return line
    rest = start[3:]
    if rest.rstrip().endswith('"""'):  # """one line"""
        return rest.rstrip()[:-3]
    parts = [rest] if rest else []
    while True:
        line = read(more)
        if line.rstrip().endswith('"""'):
            last = line.rstrip()[:-3]
            if last:
                parts.append(last)
            return "\n".join(parts)
        parts.append(line)


def setup_readline(history: Path | None) -> Callable[[], None]:
    """Arrow-key editing and history (kept in `history`); returns the function that saves it."""
    try:
        import readline  # noqa: PLC0415  (optional: absent without GNU readline)
    except ImportError:  # no GNU readline (Windows): plain input() still works
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    if history is None:
        return lambda: None
    try:
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        pass

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            tmp = history.with_name(history.name + ".tmp")
            readline.write_history_file(tmp)
            os.replace(tmp, history)
        except OSError:
            pass  # history is a convenience; never fail the exit over it

    return save


@contextmanager
def sigint_flag() -> Iterator[dict[str, bool]]:
    """While active, Ctrl-C sets flag["hit"] instead of raising, so a reply stops between tokens
    (never in the middle of an engine step, which would leave the KV-cache bookkeeping half done)."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def history_path() -> Path:
    return llmcli_home() / HISTORY_FILE
