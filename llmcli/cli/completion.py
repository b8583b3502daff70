"""Writes completions/llm.bash, completions/_llm and completions/llm.fish from typer's templates.

The scripts call back into `llm` for candidates, so they stay valid as commands change; a test
regenerates them and fails when the committed copies differ (`make completions` refreshes them).
"""

from __future__ import annotations

from pathlib import Path

from typer._completion_shared import get_completion_script

FILES = {"bash": "llm.bash", "zsh": "_llm", "fish": "llm.fish"}


def scripts() -> dict[str, str]:
    return {
        name: get_completion_script(prog_name="llm", complete_var="_LLM_COMPLETE", shell=shell) + "\n"
        for shell, name in FILES.items()
    }


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in scripts().items():
        (directory / name).write_text(text)


if __name__ == "__main__":
    write(Path(__file__).resolve().parents[2] / "completions")
