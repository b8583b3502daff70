"""`llm quantize` end to end through the CLI entry point: outputs, config, summary, errors."""

from __future__ import annotations

import json

import pytest

from llmcli.cli import main


def _run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_quantize_int4_writes_a_loadable_dir(tiny_model, tmp_path, capsys):
    from llmcli.engine.loader import load_model
    from llmcli.quant.linear import Int4Linear

    src = tiny_model("llama")
    out = tmp_path / "int4"
    code, stdout, _ = _run(capsys, "quantize", str(src), "--bits", "4", "--group-size", "128", "-o", str(out), "--json")
    assert code == 0
    s = json.loads(stdout)
    # hidden 64 / intermediate 128: q,k,v,o,gate,up (in 64) fall back to group 64, down (in 128) keeps 128
    assert s["group_sizes"] == {"64": 18, "128": 3} and s["method"] == "hqq"
    assert "not a multiple of 128" in s["notes"][0]
    assert s["bytes_after"] < s["bytes_before_16bit"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "llmcli",
        "bits": 4,
        "group_size": 128,
        "method": "hqq",
        "quantize_embeddings": False,
    }
    model, _ = load_model(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    assert model.model.layers[0].self_attn.qkv_proj.group_size == 64
    assert not list(tmp_path.glob(".int4.*"))  # no temporary directory left behind

    # an existing output is kept unless --force
    code, _, err = _run(capsys, "quantize", str(src), "--bits", "4", "-o", str(out))
    assert code == 1 and err.startswith("error:") and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, _ = _run(capsys, "quantize", str(src), "--bits", "8", "-o", str(out), "--force", "--json")
    assert code == 0 and json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_quantize_default_output_in_store(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "home"))
    src = tiny_model("qwen3")
    code, stdout, _ = _run(capsys, "quantize", str(src), "--json")
    assert code == 0
    assert json.loads(stdout)["output"] == str(tmp_path / "home" / "models" / f"{src.name.lower()}-int8")


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--bits", "3"], "--bits must be 8 or 4"),
        (["--bits", "4", "--group-size", "100"], "--group-size"),
        (["--method", "magic"], "unknown method"),
        (["--bits", "4", "--method", "gptq"], "--calibration"),
        (["--format", "onnx"], "--format"),
    ],
)
def test_quantize_user_errors(tiny_model, tmp_path, capsys, args, msg):
    code, _, err = _run(capsys, "quantize", str(tiny_model("llama")), "-o", str(tmp_path / "x"), *args)
    assert code == 1 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
