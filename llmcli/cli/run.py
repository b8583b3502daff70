"""Placeholder commands until their issue lands."""

from llmcli.cli import app
from llmcli.errors import UserError


@app.command("run")
def run(model: str = None) -> None:
    """Generate a reply to one prompt."""
    raise UserError("llm run is not yet implemented", exit_code=2)


@app.command("bench")
def bench(model: str = None) -> None:
    """Benchmark prefill and decode speed."""
    raise UserError("llm bench is not yet implemented", exit_code=2)
