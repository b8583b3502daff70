"""`llm pull` against a real local HTTP server speaking the Hub protocol (tests/hub_server.py).

The CLI runs as a subprocess: huggingface_hub reads HF_ENDPOINT/HF_HOME when it is imported.
References: huggingface_hub's own cache reader (scan_cache_dir, hf_hub_download(local_files_only=True)),
transformers' AutoConfig, and hashlib over the bytes the server holds.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import ROOT, HubServer, Knobs, add_revision, cli_env, files_from_dir, make_repo, run_llm

BIG = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_files(tiny_model):
    files = files_from_dir(tiny_model("llama"))
    files["pytorch_model.bin"] = b"\x80\x04pickled weights"  # must never be fetched
    files["README.md"] = b"# tiny\n"
    files["tokenizer_config.json"] = b'{"eos_token": "</s>", "chat_template": "{{ messages }}"}'
    return files


@pytest.fixture(scope="module")
def server(tiny_files):
    with HubServer() as s:
        s.repos["org/tiny"] = make_repo(tiny_files)
        add_revision(s.repos["org/tiny"], "v2", {**tiny_files, "config.json": tiny_files["config.json"] + b"\n"})
        s.repos["org/pickles"] = make_repo(
            {"config.json": tiny_files["config.json"], "pytorch_model.bin": b"\x80\x04x", "README.md": b"hi"}
        )
        s.repos["org/gated"] = make_repo({k: tiny_files[k] for k in ("config.json", BIG)}, gated=True)
        gg = {
            "model-Q4_K_M.gguf": os.urandom(3000),
            "model-Q4_K_S.gguf": os.urandom(2500),
            "model-Q8_0.gguf": os.urandom(5000),
            "README.md": b"gguf",
        }
        s.repos["org/gg"] = make_repo(gg)
        add_revision(s.repos["org/gg"], "Q8_0", {"model-F16.gguf": os.urandom(100)})  # a branch named like a tag
        yield s


@pytest.fixture()
def hub(server):
    server.knobs = Knobs()
    server.log.clear()
    return server


@pytest.fixture()
def env(tmp_path, hub):
    return cli_env(hub.url, tmp_path)


llm = run_llm


def start(env, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "llmcli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )


def repo_dir(env, repo="org/tiny") -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + repo.replace("/", "--"))


def one_error_line(r) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_clean_pull_is_the_huggingface_cache(env, hub, tiny_files):
    r = llm(env, "pull", "org/tiny")
    assert r.returncode == 0, r.stderr
    snap = Path(r.stdout.strip().splitlines()[-1])
    commit = hub.repos["org/tiny"].refs["main"]
    assert snap == repo_dir(env) / "snapshots" / commit
    got = sorted(str(p.relative_to(snap)) for p in snap.rglob("*"))
    assert got == ["config.json", "generation_config.json", BIG, "tokenizer_config.json"]
    for name in got:
        assert (snap / name).read_bytes() == tiny_files[name]
    # huggingface_hub's own reader sees the same thing
    from huggingface_hub import hf_hub_download, scan_cache_dir

    cache = Path(env["HF_HOME"]) / "hub"
    info = scan_cache_dir(cache)
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny" and not info.warnings
    (rev,) = repo.revisions
    assert rev.commit_hash == commit and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == set(got)
    blob = Path(hf_hub_download("org/tiny", BIG, cache_dir=cache, local_files_only=True))
    assert blob == snap / BIG and blob.resolve().name == sha256(tiny_files[BIG])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True)
    assert cfg.num_hidden_layers == 3
    # huggingface_hub online (HEAD -> etag) finds our blob under the name it would have used: no download
    hub.log.clear()
    code = "from huggingface_hub import hf_hub_download as d; print(d('org/tiny', 'model.safetensors'))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(blob), r.stderr
    assert ("HEAD", f"/org/tiny/resolve/main/{BIG}", None) in hub.log and not hub.ranges("")
    # pulling again downloads nothing
    hub.log.clear()
    r2 = llm(env, "pull", "org/tiny", "--quiet")
    assert r2.returncode == 0 and r2.stdout.strip() == str(snap) and not hub.ranges("")


def test_include_exclude_and_revision(env, hub, tiny_files):
    r = llm(env, "pull", "org/tiny", "--include", "*.json", "--exclude", "generation_config.json", "-q")
    assert r.returncode == 0, r.stderr
    snap = Path(r.stdout.strip())
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "tokenizer_config.json"]
    r = llm(env, "pull", "org/tiny:v2", "-q")
    assert r.returncode == 0, r.stderr
    v2 = Path(r.stdout.strip())
    assert v2.name == hub.repos["org/tiny"].refs["v2"]
    assert (repo_dir(env) / "refs" / "v2").read_text() == v2.name
    assert (v2 / "config.json").read_bytes() == tiny_files["config.json"] + b"\n"


def test_paged_listing_is_followed(env, hub, tiny_files):
    hub.knobs.page_size = 2
    r = llm(env, "pull", "org/tiny", "-q")
    assert r.returncode == 0, r.stderr
    pages = [p for m, p, _ in hub.log if m == "GET" and "/tree/" in p]
    assert len(pages) == -(-len(tiny_files) // 2) > 1  # every page, no more
    snap = Path(r.stdout.strip())
    want = ["config.json", "generation_config.json", BIG, "tokenizer_config.json"]
    assert sorted(p.name for p in snap.iterdir()) == want


def test_pickle_only_repo_is_refused(env, hub):
    line = one_error_line(llm(env, "pull", "org/pickles"))
    assert "pickle" in line and "pytorch_model.bin" in line
    assert not hub.ranges("pytorch_model.bin")


def test_cut_connection_then_resume_with_range(env, hub, tiny_files):
    """With retries off, a cut ends the run; the next run continues from the bytes on disk."""
    hub.knobs.cut_after[BIG] = 200_000
    line = one_error_line(llm({**env, "LLMCLI_HUB_RETRIES": "0"}, "pull", "org/tiny"))
    assert BIG in line and "llm pull org/tiny" in line and "connection" in line
    part = repo_dir(env) / "blobs" / (sha256(tiny_files[BIG]) + ".incomplete")
    kept = part.stat().st_size
    assert 0 < kept <= 200_000
    assert not (repo_dir(env) / "blobs" / sha256(tiny_files[BIG])).exists()
    hub.log.clear()
    r = llm(env, "pull", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert hub.ranges(BIG) == [f"bytes={kept}-"]
    assert (Path(r.stdout.strip()) / BIG).read_bytes() == tiny_files[BIG]


def test_killed_pull_resumes(env, hub, tiny_files):
    hub.knobs.throttle = 0.1  # 64 KiB per 0.1 s: the 580 KB file takes ~1 s
    p = start(env, "pull", "org/tiny")
    part = repo_dir(env) / "blobs" / (sha256(tiny_files[BIG]) + ".incomplete")
    deadline = time.time() + 30
    while time.time() < deadline and not (part.exists() and part.stat().st_size >= 130_000):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = part.stat().st_size
    assert 0 < kept < len(tiny_files[BIG])
    hub.knobs.throttle = 0
    hub.log.clear()
    r = llm(env, "pull", "org/tiny")
    assert r.returncode == 0, r.stderr
    (rng,) = hub.ranges(BIG)
    assert int(rng.removeprefix("bytes=").rstrip("-")) >= kept > 0
    assert (Path(r.stdout.strip()) / BIG).read_bytes() == tiny_files[BIG]


def test_ctrl_c_stops_quickly_and_says_how_to_resume(env, hub, tiny_files):
    hub.knobs.throttle = 0.2
    p = start(env, "pull", "org/tiny")
    part = repo_dir(env) / "blobs" / (sha256(tiny_files[BIG]) + ".incomplete")
    deadline = time.time() + 30
    while time.time() < deadline and not part.exists():
        time.sleep(0.02)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert time.time() - t0 < 1.5
    assert p.returncode == 130 and "llm pull org/tiny" in err and "Traceback" not in err
    assert part.exists()


@pytest.mark.parametrize("name", [BIG, "config.json"])  # sha256 (LFS) and git blob sha1
def test_corrupt_bytes_retried_once_then_named(env, hub, tiny_files, name):
    hub.knobs.corrupt[name] = 1
    r = llm(env, "pull", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert "mismatch" in r.stderr and len(hub.ranges(name)) == 2
    assert (Path(r.stdout.strip()) / name).read_bytes() == tiny_files[name]


def test_corrupt_twice_fails_and_keeps_nothing(env, hub, tiny_files):
    hub.knobs.corrupt[BIG] = 2
    line = one_error_line(llm(env, "pull", "org/tiny"))
    assert BIG in line and "verification" in line
    blobs = repo_dir(env) / "blobs"
    assert not (blobs / sha256(tiny_files[BIG])).exists()
    assert not list(blobs.glob("*.incomplete"))
    assert not list((repo_dir(env) / "snapshots").rglob(BIG))


def test_gated_repo_needs_a_token(env, hub):
    line = one_error_line(llm(env, "pull", "org/gated"))
    assert "gated" in line and "HF_TOKEN" in line and "--token" in line
    line = one_error_line(llm({**env, "HF_TOKEN": "hf_wrong"}, "pull", "org/gated"))
    assert "gated" in line
    r = llm({**env, "HF_TOKEN": "hf_good"}, "pull", "org/gated", "-q")
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / BIG).is_file()
    r = llm(env, "pull", "org/gated", "--token", "hf_good", "-q")
    assert r.returncode == 0, r.stderr


def test_missing_repo_and_revision(env):
    assert "org/nope not found" in one_error_line(llm(env, "pull", "org/nope"))
    assert "revision 'nope' not found" in one_error_line(llm(env, "pull", "org/tiny", "--revision", "nope"))
    assert "revision 'nope' not found" in one_error_line(llm(env, "pull", "org/tiny:nope"))
    assert "not a Hub repo id" in one_error_line(llm(env, "pull", "justaname"))


def test_offline_and_no_network(env, hub, tiny_files):
    off = {**env, "HF_HUB_OFFLINE": "1"}
    line = one_error_line(llm(off, "pull", "org/tiny"))
    assert "HF_HUB_OFFLINE" in line and "not in the cache" in line
    dead = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port
    line = one_error_line(llm(dead, "pull", "org/tiny"))
    assert "cannot reach" in line and "no cached copy" in line
    r = llm(env, "pull", "org/tiny", "-q")
    assert r.returncode == 0, r.stderr
    hub.log.clear()
    r2 = llm(off, "pull", "org/tiny", "-q")
    assert r2.returncode == 0 and r2.stdout.strip() == r.stdout.strip() and not hub.log
    line = one_error_line(llm(dead, "pull", "org/tiny"))
    assert "a cached copy exists" in line


def test_concurrent_pulls_share_one_download(env, hub, tiny_files):
    hub.knobs.throttle = 0.05
    a, b = start(env, "pull", "org/tiny"), start(env, "pull", "org/tiny")
    outs = [p.communicate(timeout=60) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert outs[0][0].strip() == outs[1][0].strip()
    assert len(hub.ranges(BIG)) == 1  # the second waited on the blob lock instead of downloading again
    assert (Path(outs[0][0].strip()) / BIG).read_bytes() == tiny_files[BIG]


def test_gguf_tags(env, hub):
    files = hub.repos["org/gg"].commits[hub.repos["org/gg"].refs["main"]]
    line = one_error_line(llm(env, "pull", "org/gg"))  # not interactive: list and fail
    assert all(n in line for n in ("model-Q4_K_M.gguf", "model-Q8_0.gguf", "3.0 KB")) and "org/gg:TAG" in line
    r = llm(env, "pull", "org/gg:q4_k_m", "-q")
    assert r.returncode == 0, r.stderr
    p = Path(r.stdout.strip())
    assert p.name == "model-Q4_K_M.gguf" and p.read_bytes() == files["model-Q4_K_M.gguf"]
    assert [x.name for x in p.parent.iterdir()] == ["model-Q4_K_M.gguf"]
    assert "several" in one_error_line(llm(env, "pull", "org/gg:Q4_K"))
    # A tag that names a GGUF wins over the branch of the same name
    r = llm(env, "pull", "org/gg:Q8_0", "-q")
    assert Path(r.stdout.strip()).name == "model-Q8_0.gguf"
    r = llm(env, "pull", "org/gg", "--revision", "Q8_0", "--file", "model-F16.gguf", "-q")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent.name == hub.repos["org/gg"].refs["Q8_0"]


def test_disk_space_is_checked_first(env, hub):
    line = one_error_line(llm({**env, "LLMCLI_FREE_BYTES": "1000"}, "pull", "org/tiny"))
    assert "not enough disk space" in line
    assert not hub.ranges("")


def test_terminal_progress_prompts_and_offer(env, hub, tiny_files):
    """On a terminal: pick a GGUF from a list, rich progress bars, rm asks, a missing repo is offered."""
    pexpect = pytest.importorskip("pexpect")

    def spawn(*args):
        return pexpect.spawn(
            sys.executable,
            ["-m", "llmcli", *args],
            env={**env, "COLUMNS": "120"},
            cwd=str(ROOT),
            encoding="utf-8",
            timeout=30,
            dimensions=(40, 120),
        )

    files = hub.repos["org/gg"].commits[hub.repos["org/gg"].refs["main"]]
    p = spawn("pull", "org/gg")
    p.expect("model-Q8_0.gguf  \\(5.0 KB\\)")
    p.expect("which file")
    p.sendline("3")
    p.expect(pexpect.EOF)
    out = p.before
    p.close()
    assert p.exitstatus == 0, out
    assert "pulling org/gg" in out and "5.0/5.0 kB" in out  # rich's bar: bytes done/total
    path = Path(re.search(r"/\S+model-Q8_0\.gguf", out).group(0))  # the last line, past rich's cursor codes
    assert path.read_bytes() == files["model-Q8_0.gguf"]

    p = spawn("rm", "org/gg")
    p.expect("delete org/gg")
    p.sendline("y")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and not path.exists()

    p = spawn("show", "org/tiny")
    p.expect("org/tiny is not downloaded. Pull it now")
    p.sendline("")  # default: yes
    p.expect("architecture +llama")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


def test_full_disk_mid_file_keeps_bytes_and_resumes(env, hub, tiny_files):
    """A file-size limit makes writes fail past 300 kB, as a full disk does; the next pull continues."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    r = subprocess.run(
        [sys.executable, "-m", "llmcli", "pull", "org/tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )
    line = one_error_line(r)
    assert "disk full" in line and BIG in line and "llm pull org/tiny" in line
    part = repo_dir(env) / "blobs" / (sha256(tiny_files[BIG]) + ".incomplete")
    kept = part.stat().st_size
    assert 0 < kept <= 300_000
    hub.log.clear()
    r = llm(env, "pull", "org/tiny", "-q")
    assert r.returncode == 0, r.stderr
    assert hub.ranges(BIG) == [f"bytes={kept}-"]
    assert (Path(r.stdout.strip()) / BIG).read_bytes() == tiny_files[BIG]


# ---- retries ---------------------------------------------------------------------------------------

FAST = {"LLMCLI_HUB_BACKOFF": "0.05"}


def range_starts(hub, name) -> list[int]:
    return [int(r.removeprefix("bytes=").rstrip("-")) if r else 0 for r in hub.ranges(name)]


def test_connection_cut_twice_in_one_run_is_retried_from_the_bytes_on_disk(env, hub, tiny_files):
    size = len(tiny_files[BIG])
    hub.knobs.cut_every[BIG] = 200_000  # each of the first two GETs sends 200 kB of the 580 kB file, then drops
    hub.knobs.cut_times = 2
    r = llm({**env, **FAST}, "pull", "org/tiny")
    assert r.returncode == 0, r.stderr
    said = [int(n) for n in re.findall(rf"{re.escape(BIG)}: .* at (\d+) bytes; retrying", r.stderr)]
    starts = range_starts(hub, BIG)
    assert len(said) == 2 and starts == [0, *said], (r.stderr, hub.ranges(BIG))  # resumed where the bytes on disk end
    assert 0 < said[0] <= 200_000 < said[1] <= 400_000 < size
    blob = repo_dir(env) / "blobs" / sha256(tiny_files[BIG])
    assert sha256(blob.read_bytes()) == blob.name  # verified: the blob is named by the hash of its bytes
    assert (Path(r.stdout.strip().splitlines()[-1]) / BIG).read_bytes() == tiny_files[BIG]
    assert not list(blob.parent.glob("*.incomplete"))


def test_server_errors_are_retried(env, hub, tiny_files):
    hub.knobs.fail_status, hub.knobs.fail_times = 503, 2  # the model info GET, then the first file GET
    hub.knobs.fail_match = ""
    r = llm({**env, **FAST}, "pull", "org/tiny", "-q")
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / BIG).read_bytes() == tiny_files[BIG]


@pytest.mark.parametrize("fault", ["503", "cut"])
def test_a_server_that_keeps_failing_ends_after_the_retries(env, hub, fault):
    if fault == "503":
        hub.knobs.fail_status = 503
    else:  # every GET of the file drops before its first byte
        hub.knobs.cut_every["config.json"], hub.knobs.cut_times = 0, 1 << 30
    waits = [0.2, 0.4, 0.8]  # LLMCLI_HUB_BACKOFF=0.2, 3 retries
    t0 = time.monotonic()
    r = llm({**env, "LLMCLI_HUB_RETRIES": "3", "LLMCLI_HUB_BACKOFF": "0.2"}, "pull", "org/tiny")
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert "config.json" in line and "after 3 retries" in line and "llm pull org/tiny" in line, line
    assert ("HTTP 503" in line) if fault == "503" else ("connection" in line)
    assert len(hub.ranges("config.json")) == 4  # the first try and 3 retries, then no more
    assert sum(waits) <= took < sum(waits) + 15, took  # it waited out the backoff, and no longer than that + start-up


@pytest.mark.parametrize("status", [401, 403, 404])
def test_answers_are_not_retried(env, hub, status):
    hub.knobs.fail_status = status
    line = one_error_line(llm({**env, **FAST}, "pull", "org/tiny"))
    assert "retr" not in line
    assert len(hub.ranges("config.json")) == 1 and len(hub.ranges("")) == 1


def test_ctrl_c_during_a_retry_wait_stops_at_once(env, hub):
    hub.knobs.fail_status = 503
    p = start({**env, "LLMCLI_HUB_BACKOFF": "30"}, "pull", "org/tiny")
    deadline = time.time() + 30
    while time.time() < deadline and not hub.ranges(""):
        time.sleep(0.02)
    time.sleep(0.3)  # now in the 30 s wait
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert time.time() - t0 < 1.5
    assert p.returncode == 130 and "llm pull org/tiny" in err and "Traceback" not in err
    assert len(hub.ranges("")) == 1


# ---- failing fast --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pull", "estimate"])
def test_no_network_fails_in_a_second_or_two(tmp_path, command):
    """Nothing listens on the endpoint: one line, without huggingface_hub's 23 s of retries."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cli_env(f"http://127.0.0.1:{port}", tmp_path)
    t0 = time.monotonic()
    line = one_error_line(llm(env, command, "org/tiny"))
    took = time.monotonic() - t0
    assert "cannot reach" in line and f"127.0.0.1:{port}" in line, line
    assert took < 8, took  # was 24 s for estimate; most of what is left is starting Python


def test_estimate_reads_config_from_the_hub_and_then_from_the_cache(env, hub, tiny_files, tmp_path):
    import json

    r = llm({**env, **FAST}, "estimate", "org/tiny", "--json")
    assert r.returncode == 0, r.stderr
    assert ("HEAD", "/org/tiny/resolve/main/config.json", None) in hub.log
    first = json.loads(r.stdout)
    hub.knobs.fail_status = 503  # the Hub is down now: the cached config.json is used, after the retries
    r = llm({**env, **FAST}, "estimate", "org/tiny", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == first
    line = one_error_line(llm({**env, **FAST}, "estimate", "org/tiny:v2"))  # not cached
    assert "kept failing (HTTP 503)" in line and "not in the local cache" in line, line
    assert len([p for m, p, _ in hub.log if m == "HEAD" and p.endswith("/v2/config.json")]) == 4  # 1 + 3 retries
    hub.knobs.fail_status = 0
    line = one_error_line(llm({**env, **FAST}, "estimate", "org/nope"))
    assert "org/nope" in line and "neither a local path nor a Hub repository" in line
