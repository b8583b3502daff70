"""How a reply is shown as it streams in: plain text, or Markdown rendered block by finished block."""

from __future__ import annotations

from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment


class PlainRenderer:
    """Writes each piece as it arrives."""

    def __init__(self, file: TextIO):
        self.file = file

    def feed(self, piece: str) -> None:
        self.file.write(piece)
        self.file.flush()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


def split_finished_blocks(text: str) -> tuple[str, str]:
    """Split markdown into (complete blocks, unfinished tail).

    A block ends at a blank line outside a fenced code block, or at a closing fence. Rendering only finished
    blocks means a block is never re-rendered differently once printed.
    """
    lines = text.split("\n")
    in_fence, fence, cut = False, "", 0
    pos = 0
    for i, line in enumerate(lines[:-1]):  # the last element is an unterminated line: never complete
        pos += len(line) + 1
        s = line.strip()
        if in_fence:
            if s.startswith(fence) and s.strip("`~") == "":
                in_fence = False
                cut = pos
        elif s.startswith("```") or s.startswith("~~~"):
            in_fence, fence = True, s[:3]
        elif s == "" and i > 0:
            cut = pos
    return text[:cut], text[cut:]


class _Tail:
    """Renders markdown but shows only its last lines, so the live area never outgrows the terminal
    (rich Live cannot redraw what has scrolled off, and would duplicate it)."""

    def __init__(self, text: str):
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(Markdown(self.text), options, pad=False)
        keep = max(1, console.size.height - 2)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


class MarkdownRenderer:
    """Prints finished blocks as rendered Markdown; only the unfinished tail is live (re-rendered)."""

    def __init__(self, console: Console):
        self.console, self.buf = console, ""
        self.live = Live(console=console, auto_refresh=False, transient=True)
        self.live.start()

    def feed(self, piece: str) -> None:
        self.buf += piece
        done, self.buf = split_finished_blocks(self.buf)
        if done.strip():
            self.live.update("", refresh=True)
            self.console.print(Markdown(done))
        self.live.update(_Tail(self.buf), refresh=True)

    def close(self) -> None:
        self.live.update("", refresh=True)
        self.live.stop()
        if self.buf.strip():
            self.console.print(Markdown(self.buf))
        self.buf = ""
