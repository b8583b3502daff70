"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("estimate")
def estimate(model: str = None) -> None:
    """Estimate parameters, memory and what fits a GPU."""
    raise UserError("llm estimate is not yet implemented", exit_code=2)
