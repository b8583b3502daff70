"""`llm bench` on quantized checkpoints and `--compare int8,int4` (quantized variants beside the original)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from llmcli.cli import main
from llmcli.errors import UserError
from llmcli.tools.bench import QUANT_VARIANTS, parse_compare

SHORT = ("--prompt-len", "8", "--gen-len", "4", "--rounds", "1", "--json")


def _run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_parse_compare():
    assert parse_compare(None) is None and parse_compare("transformers") == "transformers"
    assert parse_compare("int8, int4,int8") == ["int8", "int4"]  # order kept, repeats dropped
    assert set(parse_compare(",".join(QUANT_VARIANTS))) == set(QUANT_VARIANTS)
    for bad in ("int3", "int8,vllm", ",", ""):
        with pytest.raises(UserError, match="transformers"):
            parse_compare(bad)


@pytest.mark.parametrize("bits", ["8", "4"])
def test_bench_runs_on_a_quantized_dir(tiny_model, tmp_path, capsys, one_thread, bits):
    from llmcli.config import load_config
    from llmcli.estimate import count_params

    src = tiny_model("llama", num_hidden_layers=2)
    out = tmp_path / f"q{bits}"
    assert _run(capsys, "quantize", str(src), "--bits", bits, "--method", "rtn", "-o", str(out), "--json")[0] == 0
    code, stdout, err = _run(capsys, "bench", str(out), *SHORT)
    assert code == 0, err
    j = json.loads(stdout)
    (r,) = j["results"]
    assert r["engine"] == "llmcli" and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert j["params_total"] == count_params(load_config(src)).total  # the same model, only stored smaller


def test_bench_compare_quantized_variants(tiny_model, tmp_path, capsys, one_thread):
    src = tiny_model("llama", num_hidden_layers=2)
    before = set(Path(tempfile.gettempdir()).glob("llm-bench-*"))
    code, stdout, err = _run(capsys, "bench", str(src), "--compare", "int8,int4-g32", *SHORT)
    assert code == 0, err
    j = json.loads(stdout)
    names = [r["engine"] for r in j["results"]]
    assert names == ["original", "int8", "int4-g32"]
    base = j["results"][0]["decode_tok_s"]
    for r in j["results"]:
        assert r["decode_tok_s"] > 0 and r["gen_len"] == 4 and r["prompt_len"] == 8
        assert j["decode_vs_original"][r["engine"]] == pytest.approx(r["decode_tok_s"] / base)
        assert (r["peak_memory_gib"] is not None) == (r["engine"] == "original")
    assert set(Path(tempfile.gettempdir()).glob("llm-bench-*")) <= before  # the quantized copies are gone

    # a table with the ratio column
    code, stdout, _ = _run(
        capsys, "bench", str(src), "--compare", "int4", "--prompt-len", "8", "--gen-len", "4", "--rounds", "1"
    )
    assert code == 0 and "decode x" in stdout and "int4-g128" in stdout and "original" in stdout

    # a quantized source cannot be re-quantized: one-line error
    q = tmp_path / "q8"
    assert _run(capsys, "quantize", str(src), "--bits", "8", "-o", str(q), "--json")[0] == 0
    code, _, err = _run(capsys, "bench", str(q), "--compare", "int4", *SHORT)
    assert code == 1 and err.startswith("error:") and "unquantized" in err and len(err.strip().splitlines()) == 1
