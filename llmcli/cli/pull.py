"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("pull")
def pull(model: str = None) -> None:
    """Download a model from the Hugging Face Hub."""
    raise UserError("llm pull is not yet implemented", exit_code=2)
