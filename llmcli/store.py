"""The local model store and the one resolver every command uses to find a model.

resolve_model(spec) -> Path of a local model directory (config.json + safetensors) or a .gguf file.
"""

from __future__ import annotations

from pathlib import Path

from llmcli.errors import UserError


def resolve_model(spec: str | None, *, pull: bool = False) -> Path:
    """None: the embedded default model. Otherwise a local directory or .gguf file.

    (Hub repo ids, REPO:REVISION and names from `llm list` are resolved by the store; see the pull issue.)
    """
    if spec is None:
        from llmcli.default_model import default_model_path

        return default_model_path()
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.exists():
        raise UserError(f"{spec} is neither a model directory (with config.json) nor a .gguf file")
    raise UserError(f"model {spec!r} not found")
