"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("quantize")
def quantize(model: str = None) -> None:
    """Write an INT8/INT4/NF4 weight-only checkpoint."""
    raise UserError("llm quantize is not yet implemented", exit_code=2)


@app.command("perplexity")
def perplexity(model: str = None) -> None:
    """Measure a model's perplexity on a text file."""
    raise UserError("llm perplexity is not yet implemented", exit_code=2)
