"""`llm quantize` end to end through the CLI entry point: outputs, config, summary, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def _modes(root) -> set[tuple[str, int]]:
    import stat

    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_take_the_umask_modes(tiny_model, smollm2_gguf, tmp_path, capsys, umask):
    from llmcli.quant.checkpoint import write_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        (src / f).write_bytes((tiny_model("llama", vocab_size=49152) / f).read_bytes())
    write_tokenizer(smollm2_gguf, src)
    (src / "tokenizer.json").chmod(0o400)  # a source file's own mode is not copied
    old = os.umask(umask)
    try:
        assert _run(capsys, "quantize", str(src), "-o", str(tmp_path / "d" / "int8"))[0] == 0
        assert _run(capsys, "quantize", str(src), "--format", "gguf", "-o", str(tmp_path / "g.gguf"))[0] == 0
    finally:
        os.umask(old)
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    assert _modes(tmp_path / "d" / "int8") == {("dir", want_dir), ("file", want_file)}
    assert _modes(tmp_path / "d") >= {("dir", want_dir)}
    assert _modes(tmp_path / "g.gguf") == {("file", want_file)}


def test_refuses_to_overwrite_its_source(tiny_model, smollm2_gguf, tmp_path, capsys, monkeypatch):
    import shutil

    import llmcli.quant.checkpoint as C

    src = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), src)
    gguf = tmp_path / "s.gguf"
    gguf.symlink_to(smollm2_gguf)  # the same file under another name is still the source
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.setattr(C, "open_source", lambda *a: pytest.fail("work started"))
    cases = [
        ([str(src), "-o", str(src)], "is the source"),
        ([str(src), "-o", str(src / "sub")], "is inside the source"),
        ([str(src), "-o", str(tmp_path)], "holds the source"),
        ([str(gguf), "--format", "gguf", "-o", str(smollm2_gguf)], "is the source"),
        ([str(smollm2_gguf), "--format", "gguf", "-o", str(gguf)], "is the source"),
    ]
    for args, msg in cases:
        code, _, err = _run(capsys, "quantize", *args, "--force")
        assert code == 1 and msg in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_unwritable_output_fails_before_work(tiny_model, tmp_path, capsys, monkeypatch):
    import time

    import llmcli.quant.checkpoint as C
    import llmcli.tools.calibration as cal

    monkeypatch.setattr(C, "open_source", lambda *a: pytest.fail("the model was read"))
    monkeypatch.setattr(cal, "collect_hessians", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 20)
    outs = [("/proc/x", "cannot write /proc/x"), (str(tmp_path / "file" / "out"), "is a file, not a directory")]
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        outs.append((str(ro / "out"), "cannot write"))
    for out, msg in outs:
        for extra in ([], ["--bits", "4", "--method", "gptq", "--calibration", str(text)], ["--format", "gguf"]):
            t0 = time.perf_counter()
            code, _, err = _run(capsys, "quantize", str(tiny_model("llama")), "-o", out, *extra)
            assert code == 1 and msg in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
            assert time.perf_counter() - t0 < 2


def test_gguf_output_in_store_is_listed_run_and_removed(tiny_model, smollm2_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCLI_DEFAULT_MODEL", str(smollm2_gguf))
    code, stdout, err = _run(capsys, "quantize", str(smollm2_gguf), "--format", "gguf", "--json")
    assert code == 0, err
    out = Path(json.loads(stdout)["output"])
    assert out.parent == tmp_path / "home" / "models" and out.is_file()
    (out.parent / ".junk.gguf").write_bytes(b"")  # hidden and .tmp entries are never models
    (out.parent / "half.gguf.tmp").write_bytes(b"")
    code, stdout, _ = _run(capsys, "list", "--json")
    store = [m for m in json.loads(stdout) if m["source"] == "store"]
    assert [(m["name"], m["path"], m["format"]) for m in store] == [(out.name, str(out), "GGUF Q8_0")]
    assert store[0]["size"] == out.stat().st_size
    from llmcli.hub.resolve import resolve_model

    assert resolve_model(out.name) == out
    code, stdout, _ = _run(capsys, "show", out.name, "--json")
    assert code == 0 and json.loads(stdout)["path"] == str(out)
    code, stdout, _ = _run(capsys, "rm", out.name, "--yes")
    assert code == 0 and not out.exists()
    code, stdout, _ = _run(capsys, "list", "--json")
    assert [m for m in json.loads(stdout) if m["source"] == "store"] == []


@pytest.mark.parametrize(
    "fmt,bits,dirname,label",
    [("compressed-tensors", 4, "-int4-g64-ct", "compressed-tensors"), ("gptq", 4, "-int4-g64-gptq", "gptq")],
)
def test_export_formats_of_smollm2_are_listed_shown_and_answer_paris(
    smollm2_gguf, tmp_path, capsys, monkeypatch, fmt, bits, dirname, label
):
    """`llm quantize --format compressed-tensors|gptq` of the built-in GGUF (expanded to float first) writes into
    the store; `llm list` and `llm show` see it and `llm run` on it still answers Paris."""
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCLI_DEFAULT_MODEL", str(smollm2_gguf))
    code, stdout, err = _run(capsys, "quantize", "--bits", str(bits), "--format", fmt, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    out = Path(s["output"])
    # SmolLM2's 576-wide inputs are not a multiple of 128: one group size (64) for the whole checkpoint
    assert out.name == f"smollm2-135m-instruct{dirname}" and s["group_sizes"] == {"64": 210} and s["method"] == "rtn"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    code, stdout, _ = _run(capsys, "list", "--json")
    assert [(m["name"], m["format"]) for m in json.loads(stdout) if m["source"] == "store"] == [(out.name, label)]
    code, stdout, _ = _run(capsys, "show", out.name, "--json")
    assert code == 0 and json.loads(stdout)["path"] == str(out)
    q = "What is the capital of France?"
    code, stdout, err = _run(capsys, "run", out.name, q, "--temperature", "0", "--max-tokens", "10")
    assert code == 0 and "Paris" in stdout, stdout + err
    if fmt == "compressed-tensors":  # and transformers, decompressing with the compressed-tensors package, agrees
        import torch
        import transformers

        ct = transformers.CompressedTensorsConfig(dequantize=True)  # see test_export_formats: its packed zero points
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=ct)
        tok = transformers.AutoTokenizer.from_pretrained(out)
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        reply = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :]
        assert "Paris" in tok.decode(reply, skip_special_tokens=True)


def test_export_format_errors_come_before_any_work(tiny_model, tmp_path, capsys):
    src, moe = str(tiny_model("llama")), str(tiny_model("mixtral"))
    capsys.readouterr()  # building the fixtures prints transformers' progress
    for extra, msg in (
        (["--format", "gptq", "--bits", "8"], "--format gptq is symmetric INT4"),
        (["--format", "gptq", "--bits", "4", "--method", "hqq"], "not hqq"),
        (["--format", "compressed-tensors", "--quantize-embeddings"], "--quantize-embeddings"),
        (["--format", "compressed-tensors", "--method", "nf4"], "bitsandbytes"),
    ):
        code, _, err = _run(capsys, "quantize", src, "-o", str(tmp_path / "x"), *extra)
        assert code == 1 and msg in err and len(err.strip().splitlines()) == 1, err
    text = tmp_path / "calib.txt"
    text.write_text("calibration text " * 50)
    code, _, err = _run(
        capsys, "quantize", moe, "-o", str(tmp_path / "x"), "--format", "gptq", "--bits", "4",
        "--method", "gptq", "--calibration", str(text),
    )  # fmt: skip
    assert code == 1 and "dense models only" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
