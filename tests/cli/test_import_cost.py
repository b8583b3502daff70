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
