"""Corrupt or mismatched model files end in ONE `error:` line that names the file and what is wrong with it.

Each case starts from a real tiny model saved by transformers and corrupts its bytes or JSON the way a broken
download, a bad edit or a wrong copy does. `llm run` goes through a real subprocess (`python -m llmcli`); the
other commands that read the file (show, quantize) through the CLI's own entry point in-process (faster). A
line that came from the bug catch-all ("rerun with --debug") or the library's own text does not pass.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_byte_tokenizer
from safetensors import safe_open

from llmcli.cli import main
from llmcli.formats.safetensors import safetensors_header


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "model"
    shutil.copytree(tiny_model("llama"), d)
    write_byte_tokenizer(d)
    return d


def _parts(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    b = json.dumps(header).encode()
    return struct.pack("<Q", len(b)) + b + data


def _tensors(header: dict) -> list[str]:
    """Tensor names in file order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit(fn):
    def corrupt(raw_path: Path) -> bytes:
        _, h, data = _parts(raw_path)
        out = fn(h, data)
        return out if isinstance(out, bytes) else _pack(h, data)

    return corrupt


def _overlap(h, data):
    # two tensors of one shape and dtype: the second gets the first's bytes (sizes stay consistent)
    names = _tensors(h)
    a = next(n for n in names if "q_proj" in n)
    b = next(n for n in names if "q_proj" in n and n != a)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _outside(h, data):
    last = _tensors(h)[-1]
    lo, hi = h[last]["data_offsets"]
    h[last]["data_offsets"] = [len(data) + 64, len(data) + 64 + hi - lo]


def _lm_head_shape(h, data):
    h["lm_head.weight"]["shape"][0] += 1


def _lm_head_dtype(h, data):
    h["lm_head.weight"]["dtype"] = "F99"


def _no_offsets(h, data):
    del h["lm_head.weight"]["data_offsets"]


def _header_len(value):
    def corrupt(p: Path) -> bytes:
        raw = p.read_bytes()
        return struct.pack("<Q", value(len(raw))) + raw[8:]

    return corrupt


def _header_bytes(fill: bytes):
    def corrupt(p: Path) -> bytes:
        n, _, data = _parts(p)
        return struct.pack("<Q", n) + (fill * n)[:n] + data

    return corrupt


# name -> (corrupt(model.safetensors) -> new bytes, what the line must say)
SAFETENSORS = {
    "empty": (lambda p: b"", "empty"),
    "five_bytes": (lambda p: p.read_bytes()[:5], "too short"),
    "header_len_huge": (_header_len(lambda size: 10**15), "header length"),
    "header_len_past_end": (_header_len(lambda size: size), "header length"),
    "header_not_utf8": (_header_bytes(b"\xff"), "not UTF-8"),
    "header_not_json": (_header_bytes(b"{"), "not JSON"),
    "header_a_list": (_edit(lambda h, d: _pack([1, 2], d)), "not an object"),
    "entry_lacks_offsets": (_edit(_no_offsets), "lacks dtype, shape or data_offsets"),
    "dtype_unknown": (_edit(_lm_head_dtype), "unknown dtype"),
    "shape_not_byte_length": (_edit(_lm_head_shape), "needs 65,792 bytes"),
    "offsets_outside_data": (_edit(_outside), "outside"),
    "offsets_overlap": (_edit(_overlap), "overlap"),
    "truncated": (lambda p: p.read_bytes()[:-1000], "truncated"),
    "trailing_bytes": (lambda p: p.read_bytes() + b"\0" * 16, "belong to no tensor"),
}

INDEX = "model.safetensors.index.json"
# name -> (index text, what the line must say); the model's own model.safetensors stays intact beside it
INDEXES = {
    "index_not_json": ("{nope", "not JSON"),
    "index_no_weight_map": (json.dumps({"metadata": {"total_size": 1}}), "no weight_map"),
    "index_weight_map_list": (json.dumps({"weight_map": ["model.safetensors"]}), "no weight_map"),
    "index_names_missing_shard": (
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}),
        "model-00002-of-00002.safetensors",
    ),
}


def _config_edit(**changes):
    def corrupt(p: Path) -> bytes:
        return json.dumps({**json.loads(p.read_text()), **changes}).encode()

    return corrupt


CONFIGS = {
    "config_not_utf8": (lambda p: b'{"model_type": "llama\xff"}', "not UTF-8"),
    "config_not_json": (lambda p: p.read_bytes()[:-3], "not valid JSON"),
    "config_size_a_string": (_config_edit(hidden_size="sixty-four"), "hidden_size"),
    "config_zero_heads": (_config_edit(num_attention_heads=0), "num_heads"),
}


def _case(good: Path, tmp: Path, name: str) -> tuple[Path, Path, str]:
    """(model dir, the corrupted file, expected fragment)."""
    d = tmp / name
    shutil.copytree(good, d)
    if name in SAFETENSORS:
        corrupt, want = SAFETENSORS[name]
        target = d / "model.safetensors"
        target.write_bytes(corrupt(good / "model.safetensors"))
    elif name in INDEXES:
        text, want = INDEXES[name]
        target = d / INDEX
        target.write_text(text)
    else:
        corrupt, want = CONFIGS[name]
        target = d / "config.json"
        target.write_bytes(corrupt(good / "config.json"))
    return d, target, want


def _assert_one_line(code: int, stderr: str, target: Path, want: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: error:"), line
    assert str(target) in line, line  # names the file (its full path)
    assert want in line, line  # says what is wrong
    for leak in ("Traceback", "--debug", "SafetensorError", "MemoryError", "UnicodeDecodeError", "KeyError"):
        assert leak not in line, line


def _llm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, timeout=300, env=env)


def _main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return int(e.value.code or 0), capsys.readouterr().err


ALL = [*SAFETENSORS, *INDEXES, *CONFIGS]


def test_good_model_runs_and_header_matches_safetensors(good):
    """The control: the uncorrupted copy runs, and safetensors_header agrees with the library's own parse."""
    r = _llm("run", str(good), "hi", "--raw", "-n", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    h = safetensors_header(good / "model.safetensors")
    with safe_open(good / "model.safetensors", framework="pt") as st:
        assert sorted(k for k in h if k != "__metadata__") == sorted(st.keys())
        for k in st.keys():
            assert list(st.get_slice(k).get_shape()) == h[k]["shape"]


@pytest.mark.parametrize("name", ["header_len_huge", "truncated", "index_names_missing_shard", "config_not_utf8"])
def test_run_reports_the_file_and_the_fault(name, good, tmp_path):
    """As a user runs it: a separate process (one case per kind of file; every case runs in-process below)."""
    d, target, want = _case(good, tmp_path, name)
    r = _llm("run", str(d), "hi", "--raw", "-n", "2")
    _assert_one_line(r.returncode, r.stderr, target, want)
    assert r.stdout == ""


@pytest.mark.parametrize("name", ALL)
def test_run_in_process_reports_the_file_and_the_fault(name, good, tmp_path, capsys):
    d, target, want = _case(good, tmp_path, name)
    _assert_one_line(*_main(capsys, "run", str(d), "hi", "--raw", "-n", "2"), target, want)


@pytest.mark.parametrize("name", list(SAFETENSORS))
def test_show_reports_the_file_and_the_fault(name, good, tmp_path, capsys):
    d, target, want = _case(good, tmp_path, name)
    _assert_one_line(*_main(capsys, "show", str(d)), target, want)


@pytest.mark.parametrize("name", ALL)
def test_quantize_reports_the_file_and_the_fault_and_writes_nothing(name, good, tmp_path, capsys):
    d, target, want = _case(good, tmp_path, name)
    out = tmp_path / "out"
    _assert_one_line(*_main(capsys, "quantize", str(d), "-o", str(out)), target, want)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary output left behind


def test_tokenizer_larger_than_the_vocabulary_is_refused_at_load(good, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(good, d)
    write_byte_tokenizer(d, extra=["<extra_a>", "<extra_b>"])  # ids 256 and 257 in a 256-entry model
    r = _llm("run", str(d), "hi", "--raw", "-n", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "257" in lines[0] and "256" in lines[0] and str(d) in lines[0], lines[0]
    assert "IndexError" not in r.stderr and "Traceback" not in r.stderr


def test_ids_outside_the_vocabulary_are_refused_by_the_engine(good):
    """Whatever produced them (a tokenizer loaded on its own, a caller's id list): a UserError, not IndexError."""
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.errors import UserError

    engine = LLMEngine.load(good, device="cpu", tokenizer=False)
    with pytest.raises(UserError, match="token id 256 is outside the model's vocabulary of 256"):
        engine.generate([[1, 2, 256]], SamplingParams(max_tokens=1))
    assert engine.generate([[1, 2, 255]], SamplingParams(max_tokens=1, temperature=0))  # the pool is still usable
