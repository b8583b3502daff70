"""Commands that only read files (help, list, show, estimate) never import torch: it costs seconds on a laptop."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

TORCH = re.compile(r"\|\s+torch$", re.M)  # `python -X importtime` prints one line per module, its name last


@pytest.mark.parametrize(
    "args", [["--help"], ["serve", "--help"], ["list", "--json"], ["show", "--json"], ["estimate", "--json"]]
)
def test_reading_commands_do_not_import_torch(args, tmp_path, smollm2_gguf):
    env = {
        **os.environ,
        "LLMCLI_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "LLMCLI_DEFAULT_MODEL": str(smollm2_gguf),
        "HF_HUB_OFFLINE": "1",
    }
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmcli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "llmcli" in r.stderr  # importtime really reported the imports
    assert not TORCH.search(r.stderr), f"llm {' '.join(args)} imported torch"


# What `llm run` must not pull in on its way to the first token: torch._dynamo and sympy (imported by the first
# nn.init / empty_like on a meta tensor: ~1.4 s; llmcli.models.empty avoids both), libraries of other commands
# (serving, transformers) and the Hub client (the default model is a local file).
NOT_ON_RUN_PATH = ("torch._dynamo", "sympy", "transformers", "fastapi", "uvicorn", "huggingface_hub")


def test_run_imports_nothing_it_does_not_use(tmp_path, smollm2_gguf):
    env = {
        **os.environ,
        "LLMCLI_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "LLMCLI_DEFAULT_MODEL": str(smollm2_gguf),
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmcli", "run", "hi", "--max-tokens", "1", "--temperature", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), "no reply"
    assert TORCH.search(r.stderr)  # importtime really reported the imports (run does need torch)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(NOT_ON_RUN_PATH), f"llm run imported {sorted(imported & set(NOT_ON_RUN_PATH))}"
