"""The local store: `llm list` / `show` / `rm` and resolve_model, on a cache filled by `llm pull`.

References: transformers (parameter counts, config fields), huggingface_hub.scan_cache_dir, the GGUF
metadata read with the gguf package, and closed-form parameter counts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import ROOT, HubServer, add_revision, cli_env, files_from_dir, make_repo
from hub_server import run_llm as llm

from llmcli.errors import UserError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_files(tiny_model):
    files = files_from_dir(tiny_model("llama"))
    files["tokenizer_config.json"] = json.dumps(
        {
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
        }
    ).encode()
    return files


@pytest.fixture(scope="module")
def server(tiny_files, smollm2_gguf):
    gguf = smollm2_gguf.read_bytes()
    with HubServer() as s:
        s.repos["org/tiny"] = make_repo(tiny_files)
        add_revision(s.repos["org/tiny"], "v2", {**tiny_files, "config.json": tiny_files["config.json"] + b"\n"})
        # The same bytes under two names: one blob, two snapshot links.
        s.repos["org/smol"] = make_repo({GGUF: gguf, GGUF.replace("Q4_1", "Q8_0"): gguf})
        yield s


def _fill(env) -> None:
    for spec in ("org/tiny", "org/tiny:v2", "org/smol:Q4_1", "org/smol:Q8_0"):
        r = llm(env, "pull", spec, "-q")
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def filled(server, tmp_path_factory, smollm2_gguf, tiny_model):
    """A cache with org/tiny (main, v2), org/smol (two GGUF tags), a quantized store model, the default."""
    tmp = tmp_path_factory.mktemp("store")
    env = cli_env(server.url, tmp)
    env["LLMCLI_DEFAULT_MODEL"] = str(smollm2_gguf)
    _fill(env)
    q = Path(env["LLMCLI_HOME"]) / "models" / "tiny-int8"
    shutil.copytree(tiny_model("llama"), q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "llmcli", "bits": 8, "group_size": None, "method": "rtn"}
    (q / "config.json").write_text(json.dumps(cfg))
    return env


@pytest.fixture()
def in_process(filled, monkeypatch):
    """Point this process's huggingface_hub and llmcli at the filled cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(filled["HF_HOME"]) / "hub"))
    for k in ("LLMCLI_HOME", "LLMCLI_DEFAULT_MODEL"):
        monkeypatch.setenv(k, filled[k])
    return filled


def snapshot(env, repo: str, ref: str) -> Path:
    folder = Path(env["HF_HOME"]) / "hub" / ("models--" + repo.replace("/", "--"))
    return folder / "snapshots" / (folder / "refs" / ref).read_text()


def smol_closed_form(path: Path) -> int:
    """Llama parameter count from the GGUF's own metadata (tied embeddings, no biases)."""
    import gguf

    r = gguf.GGUFReader(path)
    m = {k: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    d, n, h, kv, ff = (
        m["llama.embedding_length"],
        m["llama.block_count"],
        m["llama.attention.head_count"],
        m["llama.attention.head_count_kv"],
        m["llama.feed_forward_length"],
    )
    vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    hd = d // h
    per_layer = d * d * 2 + 2 * d * kv * hd + 3 * d * ff + 2 * d
    return vocab * d + n * per_layer + d


# ---- the resolver ------------------------------------------------------------------------------------


def test_resolver_finds_every_kind_of_name(in_process, tiny_model, smollm2_gguf, server):
    from llmcli.hub.resolve import resolve_model

    env = in_process
    main, v2 = snapshot(env, "org/tiny", "main"), snapshot(env, "org/tiny", "v2")
    assert resolve_model("org/tiny") == main
    assert resolve_model("org/tiny:v2") == v2
    assert resolve_model(f"org/tiny:{main.name[:10]}") == main
    assert resolve_model("org/smol:q4_1").name == GGUF
    assert resolve_model("org/smol:Q8_0").name == GGUF.replace("Q4_1", "Q8_0")
    smol = snapshot(env, "org/smol", "main")
    assert resolve_model(f"org/smol:Q4_1@{smol.name[:8]}") == smol / GGUF  # how `llm list` names other revisions
    with pytest.raises(UserError, match="llm pull"):
        resolve_model("org/smol:Q4_1@v9")
    with pytest.raises(UserError, match="org/smol:Q4_1"):  # two GGUFs: name one
        resolve_model("org/smol")
    assert resolve_model("tiny-int8") == Path(env["LLMCLI_HOME"]) / "models" / "tiny-int8"
    assert resolve_model("smollm2-135m-instruct") == smollm2_gguf
    assert resolve_model(None) == smollm2_gguf
    assert resolve_model(str(tiny_model("llama"))) == tiny_model("llama")
    assert resolve_model(str(smollm2_gguf)) == smollm2_gguf
    with pytest.raises(UserError, match=r"run `llm pull org/missing` first"):
        resolve_model("org/missing")
    with pytest.raises(UserError, match="not found"):
        resolve_model("no-such-model")


# The CLI resolver on a terminal: stdin reports a tty, typer.confirm answers ANSWER and records its prompt.
_OFFER = """
import sys, typer
sys.stdin.isatty = lambda: True
def confirm(text, **kw):
    print("asked: " + text, kw, file=sys.stderr)
    return ANSWER
typer.confirm = confirm
from llmcli.cli.resolve import resolve_model_spec
print(resolve_model_spec(SPEC))
"""


def test_resolver_offers_a_pull_on_a_terminal(server, tmp_path):
    env = cli_env(server.url, tmp_path)
    code = _OFFER.replace("ANSWER", "True").replace("SPEC", "'org/tiny'")
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "asked: org/tiny is not downloaded. Pull it now? {'default': True, 'err': True}" in r.stderr
    p = Path(r.stdout.strip().splitlines()[-1])
    assert p == snapshot(env, "org/tiny", "main") and (p / "model.safetensors").is_file()
    # Declined: the library's error, with the command to run.
    code = _OFFER.replace("ANSWER", "False").replace("SPEC", "'org/other'")
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "asked: org/other is not downloaded. Pull it now?" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "llmcli.errors.NotDownloaded: org/other is not downloaded; run `llm pull org/other` first"
    )
    # A command on a repo that is not local, without a terminal: the exact command to run.
    r = llm(env, "show", "org/other")
    assert (
        r.returncode == 1 and r.stderr.strip() == "error: org/other is not downloaded; run `llm pull org/other` first"
    )


# ---- list / show ---------------------------------------------------------------------------------------


def test_list(filled, tiny_model, smollm2_gguf, tiny_files):
    import transformers

    r = llm(filled, "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(rows) == {
        "smollm2-135m-instruct",
        "tiny-int8",
        "org/tiny",
        "org/tiny:v2",
        "org/smol:Q4_1",
        "org/smol:Q8_0",
    }
    n_tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama")).num_parameters()
    assert rows["org/tiny"]["params"] == n_tiny
    assert rows["org/tiny"]["format"] == "safetensors fp32"
    assert rows["org/tiny"]["revision"] == "main" and rows["org/tiny:v2"]["revision"] == "v2"
    assert rows["org/tiny"]["size"] == sum(len(b) for b in tiny_files.values())
    assert rows["tiny-int8"]["format"] == "int8" and rows["tiny-int8"]["params"] == n_tiny
    assert rows["smollm2-135m-instruct"]["source"] == "default"
    assert rows["org/smol:Q4_1"]["params"] == smol_closed_form(smollm2_gguf)
    assert rows["org/smol:Q4_1"]["format"] == "GGUF Q4_1"
    table = llm(filled, "list")
    assert table.returncode == 0 and all(name in table.stdout for name in rows)


def test_show_safetensors(filled, tiny_model, tiny_files):
    import transformers

    r = llm(filled, "show", "org/tiny", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    ref = transformers.AutoConfig.from_pretrained(tiny_model("llama"))
    assert info["architecture"] == ref.model_type
    assert (
        info["layers"],
        info["heads"],
        info["kv_heads"],
        info["head_dim"],
        info["vocab_size"],
        info["context_length"],
    ) == (
        ref.num_hidden_layers,
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.hidden_size // ref.num_attention_heads,
        ref.vocab_size,
        ref.max_position_embeddings,
    )
    assert info["parameters"] == info["active_parameters"]
    assert info["chat_template"] is True and info["quantization"] is None
    assert info["special_tokens"] == {"bos": "<s>", "eos": "</s>"}
    assert {f["name"]: f["size"] for f in info["files"]} == {k: len(v) for k, v in tiny_files.items()}
    text = llm(filled, "show", "org/tiny")
    assert text.returncode == 0 and "llama" in text.stdout and "model.safetensors" in text.stdout


def test_show_gguf_and_moe(filled, smollm2_gguf, tiny_model):
    import gguf
    import transformers

    r = llm(filled, "show", "org/smol:Q4_1", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    meta = gguf.GGUFReader(smollm2_gguf)
    assert info["context_length"] == meta.fields["llama.context_length"].contents()
    assert info["chat_template"] is True and info["format"] == "GGUF Q4_1"
    assert info["special_tokens"]["eos"] == "<|im_end|>"  # SmolLM2-Instruct's end of turn
    assert info["parameters"] == smol_closed_form(smollm2_gguf)
    # MoE: total from the tensors, active = total minus the experts a token skips
    d = tiny_model("mixtral")
    r = llm(filled, "show", str(d), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = transformers.AutoConfig.from_pretrained(d)
    total = transformers.AutoModelForCausalLM.from_pretrained(d).num_parameters()
    skipped = (
        cfg.num_hidden_layers
        * (cfg.num_local_experts - cfg.num_experts_per_tok)
        * 3
        * cfg.hidden_size
        * cfg.intermediate_size
    )
    assert (info["parameters"], info["active_parameters"]) == (total, total - skipped)


# ---- rm ------------------------------------------------------------------------------------------------


def test_rm_round_trip(server, tmp_path, smollm2_gguf, tiny_files):
    from huggingface_hub import scan_cache_dir

    env = cli_env(server.url, tmp_path)
    env["LLMCLI_DEFAULT_MODEL"] = str(smollm2_gguf)
    _fill(env)
    store = Path(env["LLMCLI_HOME"]) / "models" / "mine"
    store.mkdir(parents=True)
    (store / "config.json").write_text(tiny_files["config.json"].decode())
    cache = Path(env["HF_HOME"]) / "hub"

    def names():
        return {m["name"] for m in json.loads(llm(env, "list", "--json").stdout)}

    r = llm(env, "rm", "org/tiny")  # no terminal, no --yes
    assert r.returncode == 1 and "--yes" in r.stderr and "org/tiny" in names()
    r = llm(env, "rm", "smollm2-135m-instruct", "--yes")
    assert r.returncode == 1 and "default" in r.stderr and smollm2_gguf.is_file()

    # one GGUF of two: the shared blob stays for the other name
    assert llm(env, "rm", "org/smol:Q8_0", "--yes").returncode == 0
    assert "org/smol:Q8_0" not in names()
    assert (snapshot(env, "org/smol", "main") / GGUF).read_bytes()[:4] == b"GGUF"

    # one revision: blobs only it used go, shared ones stay
    v2 = snapshot(env, "org/tiny", "v2")
    v2_config_blob = (v2 / "config.json").resolve()
    r = llm(env, "rm", "org/tiny:v2", "--yes")
    assert r.returncode == 0, r.stderr
    assert not v2.exists() and not v2_config_blob.exists()
    (repo,) = [x for x in scan_cache_dir(cache).repos if x.repo_id == "org/tiny"]
    assert [rev.refs for rev in repo.revisions] == [frozenset({"main"})]
    main = snapshot(env, "org/tiny", "main")
    assert (main / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]

    # the whole repo, then a store model
    assert llm(env, "rm", "org/tiny", "--yes").returncode == 0
    assert not any(x.repo_id == "org/tiny" for x in scan_cache_dir(cache).repos)
    assert not (cache / "models--org--tiny").exists()
    assert llm(env, "rm", "mine", "-y").returncode == 0 and not store.exists()
    assert names() == {"smollm2-135m-instruct", "org/smol:Q4_1"}
    r = llm(env, "rm", "org/nothing", "--yes")
    assert r.returncode == 1 and "not in the cache" in r.stderr
