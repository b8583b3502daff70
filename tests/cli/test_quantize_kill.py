"""`llm quantize` killed (SIGKILL) at every phase: `llm list` shows no temporary output, the user's previous
output survives, and the next quantize succeeds and removes what the killed run left.

Each killed run is a subprocess that stops itself (SIGSTOP) right after the chosen step, so the kill lands at
that exact point rather than wherever a poll happened to catch it; the parent then sends SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmcli.cli import main

# The child: stop after the n-th call of one function (module attribute), then run `llm ARGS...`.
DRIVER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    target, n = sys.argv[1], int(sys.argv[2])
    mod_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(mod_name)
    except ModuleNotFoundError:  # a class attribute: module.Class.method
        m, _, cls = mod_name.rpartition(".")
        owner = getattr(importlib.import_module(m), cls)
    fn = getattr(owner, attr)
    calls = [0]

    def hooked(*a, **k):
        r = fn(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGSTOP)
        return r

    setattr(owner, attr, hooked)
    from llmcli.cli import main
    main(sys.argv[3:])
    """
)

C = "llmcli.quant.checkpoint"
# (step after which the run is killed, its n-th call): reading, the temp dir, a shard, config, tokenizer, renames
DIR_PHASES = [
    (f"{C}.open_source", 1),
    (f"{C}.ShardWriter.__init__", 1),
    (f"{C}.save_file", 1),
    (f"{C}._write_config", 1),
    (f"{C}.write_tokenizer", 1),
    ("os.replace", 1),  # the single shard renamed to model.safetensors
    ("os.replace", 2),  # the temp dir renamed onto the output (done: the new output is there)
]
# With --force over an existing output: 2 = the old output moved aside, 3 = the new one in place, old not yet gone
FORCE_PHASES = [("os.replace", 2), ("os.replace", 3)]
GGUF_PHASES = [
    (f"{C}.open_source", 1),
    ("gguf.GGUFWriter.write_header_to_file", 1),
    ("gguf.GGUFWriter.write_kv_data_to_file", 1),
    ("gguf.GGUFWriter.write_tensors_to_file", 1),
    ("os.replace", 1),
]


@pytest.fixture(scope="module")
def src(tiny_model, smollm2_gguf, tmp_path_factory) -> Path:
    """A tiny llama with SmolLM2's tokenizer files (so the tokenizer step writes files, and GGUF can be written)."""
    import shutil

    from llmcli.quant.checkpoint import write_tokenizer

    base = tiny_model("llama", vocab_size=49152)
    d = tmp_path_factory.mktemp("kill-src") / "tiny-llama"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(base / f, d / f)
    write_tokenizer(smollm2_gguf, d)
    return d


def _killed_run(target: str, n: int, args: list[str], env: dict, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    p = subprocess.Popen([sys.executable, str(driver), target, str(n), *args], env=env, stderr=subprocess.PIPE)
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    stopped = os.WIFSTOPPED(status)
    if stopped:
        os.kill(p.pid, signal.SIGKILL)
        os.waitpid(p.pid, 0)
    err = p.stderr.read().decode()
    p.stderr.close()
    assert stopped, f"{target} #{n} was never reached: {err}"


def _list(capsys) -> list[dict]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["list", "--json"])
    out, _ = capsys.readouterr()
    assert e.value.code == 0
    return [m for m in json.loads(out) if m["source"] == "store"]


def _quantize(capsys, *args) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["quantize", *args, "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return json.loads(out)


def _env(home: Path) -> dict:
    env = {**os.environ, "LLMCLI_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _names(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir())


@pytest.mark.parametrize("target,n", DIR_PHASES, ids=[f"{t.rsplit('.', 1)[-1]}-{n}" for t, n in DIR_PHASES])
def test_kill_dir_output(src, tmp_path, monkeypatch, capsys, target, n):
    home = tmp_path / "home"
    monkeypatch.setenv("LLMCLI_HOME", str(home))
    store, name = home / "models", "tiny-llama-int8"
    _killed_run(target, n, ["quantize", str(src)], _env(home), tmp_path)
    listed = _list(capsys)
    assert all(not m["name"].startswith(".") and ".llmcli-" not in m["path"] for m in listed), listed
    # before the final rename nothing is listed; after it, the finished output only
    assert [m["name"] for m in listed] == ([name] if (target, n) == ("os.replace", 2) else [])
    force = ["--force"] if listed else []
    s = _quantize(capsys, str(src), *force)
    assert s["output"] == str(store / name)
    assert _names(store) == [name]  # the killed run's temporaries are gone
    assert [m["name"] for m in _list(capsys)] == [name]


@pytest.mark.parametrize("target,n", FORCE_PHASES, ids=["old-moved-aside", "new-in-place"])
def test_kill_force_keeps_an_output(src, tmp_path, monkeypatch, capsys, target, n):
    home = tmp_path / "home"
    monkeypatch.setenv("LLMCLI_HOME", str(home))
    store, name = home / "models", "tiny-llama-int8"
    _quantize(capsys, str(src))
    before = json.loads((store / name / "config.json").read_text())["quantization_config"]
    args = ["quantize", str(src), "-o", str(store / name), "--bits", "4", "--force"]
    _killed_run(target, n, args, _env(home), tmp_path)
    assert [m["name"] for m in _list(capsys)] == [name]  # the old output (put back) or the new one: never none
    after = json.loads((store / name / "config.json").read_text())["quantization_config"]
    assert after == (before if n == 2 else {**before, "bits": 4, "group_size": 128, "method": "hqq"})
    assert _names(store) == [name]
    _quantize(capsys, str(src), "--force")
    assert _names(store) == [name]


@pytest.mark.parametrize("target,n", GGUF_PHASES, ids=[t.rsplit(".", 1)[-1] for t, _ in GGUF_PHASES])
def test_kill_gguf_output(src, tmp_path, monkeypatch, capsys, target, n):
    home = tmp_path / "home"
    monkeypatch.setenv("LLMCLI_HOME", str(home))
    store, name = home / "models", "tiny-llama.Q8_0.gguf"
    _killed_run(target, n, ["quantize", str(src), "--format", "gguf"], _env(home), tmp_path)
    listed = _list(capsys)
    assert [m["name"] for m in listed] == ([name] if target == "os.replace" else [])
    s = _quantize(capsys, str(src), "--format", "gguf", *(["--force"] if listed else []))
    assert s["output"] == str(store / name)
    assert _names(store) == [name]
