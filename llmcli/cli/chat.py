"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("chat")
def chat(model: str = None) -> None:
    """Chat with a model in the terminal."""
    raise UserError("llm chat is not yet implemented", exit_code=2)
