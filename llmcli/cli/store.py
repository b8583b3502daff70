"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("list")
def list_() -> None:
    """List local models."""
    raise UserError("llm list is not yet implemented", exit_code=2)


@app.command("show")
def show(model: str = None) -> None:
    """Show a model's details."""
    raise UserError("llm show is not yet implemented", exit_code=2)


@app.command("rm")
def rm(model: str = None) -> None:
    """Remove a local model."""
    raise UserError("llm rm is not yet implemented", exit_code=2)
