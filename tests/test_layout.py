"""The layout rule: pyproject.toml's import-linter contracts hold, and they do catch an import against the rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is in the test extra")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    # --no-cache: the copy must be analysed as it is now, not as a cache from the real tree says
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "llmcli", tree / "llmcli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def test_contracts_hold(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    "module, bad_import, contract",
    [
        ("config.py", "import llmcli.engine.llm_engine", "Layers"),  # a circle: the engine imports config
        ("layers/attention.py", "import llmcli.models.transformer", "Layers"),  # the transformer imports attention
        ("engine/llm_engine.py", "import llmcli.hub.resolve", "never resolve or download"),
        ("hub/download.py", "import typer", "never prompts or prints"),
    ],
)
def test_a_reintroduced_import_breaks_a_contract(tmp_path, module, bad_import, contract):
    tree = _copy(tmp_path)
    path = tree / "llmcli" / module
    path.write_text(path.read_text() + f"\n{bad_import}  # against the rule, on purpose\n")
    r = _lint(tree)
    assert r.returncode != 0
    broken = r.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and bad_import.split()[-1].split(".")[-1] in broken, r.stdout
