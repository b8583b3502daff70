"""Tensor parallelism on CPU: 2 gloo ranks in fp32 generate exactly the greedy tokens of one process.

One pair of processes serves the whole module (load_engine reuses its workers for every model); the orphan tests
start their own in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from llmcli.engine import tp
from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.text import prompt_ids
from llmcli.engine.tp_shard import take_rows
from llmcli.errors import UserError
from llmcli.estimate import kv_bytes_per_token
from llmcli.estimate.tensor_parallel import plan, rank_config
from llmcli.quant import QuantSpec
from llmcli.quant.checkpoint import quantize_checkpoint
from llmcli.quant.experts import QuantExperts
from llmcli.quant.linear import Int4Linear, Int8Linear
from llmcli.quant.nf4 import NF4Linear

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 9, 33, 7], [3, 4, 200, 17, 18, 19, 99, 5, 61, 62]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def two_ranks():
    yield 2
    tp.shutdown()


def reference(path: Path, **kw) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of one process: the batch of PROMPTS, and PROMPTS[0] streamed alone (batch-1 paths)."""
    engine = LLMEngine.load(path, "cpu", torch.float32, tokenizer=False, max_batch=2, **kw)
    return engine.generate(PROMPTS, GREEDY), [e.token_id for e in engine.stream(PROMPTS[0], GREEDY)]


def split_run(path: Path, world: int, **kw):
    engine = tp.load_engine(path, world, "cpu", torch.float32, tokenizer=False, max_batch=2, **kw)
    return engine, (engine.generate(PROMPTS, GREEDY), [e.token_id for e in engine.stream(PROMPTS[0], GREEDY)])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_greedy_matches_one_process(family, tiny_model, two_ranks, one_thread):
    path = tiny_model(family)
    expected = reference(path)
    engine, got = split_run(path, two_ranks)
    assert got == expected
    full, share = engine.config, engine.runner.config
    assert share.num_heads == full.num_heads // 2  # the split is real: rank 0 holds half of the query heads
    if not full.is_mla:
        assert share.num_kv_heads == full.num_kv_heads // 2
    if full.is_moe:
        assert share.moe_intermediate_size == full.moe_intermediate_size // 2


def test_int8_kv_matches_one_process(tiny_model, two_ranks, one_thread):
    path = tiny_model("qwen3")  # each rank quantizes its own KV heads: the same codes as one process
    expected = reference(path, kv_dtype="int8")
    engine, got = split_run(path, two_ranks, kv_dtype="int8")
    assert got == expected
    assert engine.runner.inner.kv_storage == torch.int8


def test_one_kv_head_is_replicated(tiny_model, two_ranks, one_thread):
    path = tiny_model("llama", num_key_value_heads=1)
    expected = reference(path)
    engine, got = split_run(path, two_ranks)
    assert got == expected
    assert engine.runner.config.num_kv_heads == 1 and engine.runner.config.num_heads == 2


@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_kv_bytes_per_rank_match_estimate(kv, tiny_model, two_ranks, one_thread):
    path = tiny_model("llama")
    engine = tp.load_engine(path, two_ranks, "cpu", torch.float32, tokenizer=False, kv_dtype=kv)
    got = engine.runner.kv_bytes_per_rank()
    tokens = (engine.runner.num_blocks + 1) * engine.runner.block_size  # the pool and its scratch block
    r = subprocess.run(
        [sys.executable, "-m", "llmcli", "estimate", str(path), "--tp", "2", "--kv-dtype", kv, "-c", str(tokens)]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    per_device = json.loads(r.stdout)["per_device"]
    assert got == [per_device["kv_bytes"]] * 2
    assert per_device["kv_bytes"] * 2 == json.loads(r.stdout)["kv_bytes"]  # 2 of 4 KV heads each: half


def forced_logits(engine, ids: list[int]) -> torch.Tensor:
    seq = engine.add(ids[:1], SamplingParams(max_tokens=0))
    try:
        return engine.extend(seq, ids[1:])
    finally:
        engine.release(seq)


@pytest.mark.parametrize("family, bits, group", [("llama", 8, 128), ("llama", 4, 32), ("mixtral", 4, 32)])
def test_quantized_checkpoint(family, bits, group, tiny_model, tmp_path, two_ranks, one_thread):
    """The INT8/INT4 CPU kernels round each rank's partial o/down sum to bf16 before the all-reduce adds them, so
    a random model's near-ties may flip: check the logits along one process's greedy path instead, and every
    greedy choice whose margin exceeds that difference. mixtral: the stacked quantized experts are split too."""
    out = tmp_path / f"int{bits}"
    quantize_checkpoint(tiny_model(family), out, QuantSpec(bits=bits, group_size=group))
    one = LLMEngine.load(out, "cpu", torch.float32, tokenizer=False)
    path = PROMPTS[1] + one.generate([PROMPTS[1]], GREEDY)[0]
    ref = forced_logits(one, path)
    engine = tp.load_engine(out, two_ranks, "cpu", torch.float32, tokenizer=False)
    got = forced_logits(engine, path)
    diff = (got - ref).abs().max().item()
    assert diff < 0.02 * ref.abs().max().item()  # bf16 rounding of the partial sums, no more
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert clear.sum() >= len(path) // 2  # most steps are decided by more than the difference
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    if family == "mixtral":
        experts = engine.model.model.layers[0].mlp.experts
        assert (
            isinstance(experts, QuantExperts)
            and experts.down_proj.in_features == engine.runner.config.moe_intermediate_size
        )
    qkv = engine.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear if bits == 8 else Int4Linear)
    share = engine.runner.config
    assert qkv.qweight.shape[0] == (share.num_heads + 2 * share.num_kv_heads) * share.head_dim  # rank 0 rows only


def test_smollm2_dequantized(smollm2_gguf, two_ranks):
    """SmolLM2's 9 query / 3 KV heads split unevenly: rank 0 holds 2 KV groups, rank 1 one."""
    ids = [[1, 504, 3575, 282, 4649, 314]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = LLMEngine.load(smollm2_gguf, "cpu", torch.float32, tokenizer=False, dequantize=True)
    expected = ref.generate(ids, params)
    del ref
    engine = tp.load_engine(smollm2_gguf, two_ranks, "cpu", torch.float32, tokenizer=False, dequantize=True)
    assert engine.generate(ids, params) == expected
    assert (engine.runner.config.num_heads, engine.runner.config.num_kv_heads) == (6, 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_smollm2_quantized_checkpoints(smollm2_gguf, bits, tmp_path, two_ranks):
    """INT8 and INT4 checkpoints of the real model, written by `llm quantize`: 2 ranks give one process's greedy
    reply to a chat question. Not to any prompt: the CPU int kernels return bf16, so each rank's partial o/down sum
    is rounded before the all-reduce adds them, which can flip a near-tie (a raw "The capital of France is" flips
    at its 6th token in both bit widths)."""
    out = tmp_path / f"int{bits}"
    cmd = [sys.executable, "-m", "llmcli", "quantize", str(smollm2_gguf), "--bits", str(bits), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = LLMEngine.load(out, "cpu", torch.float32)
    ids = [prompt_ids(one.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])]
    expected = one.generate(ids, params)
    assert "Paris" in one.tokenizer.decode(expected[0])
    del one
    engine = tp.load_engine(out, two_ranks, "cpu", torch.float32, tokenizer=False)
    qkv = engine.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear if bits == 8 else Int4Linear)  # the checkpoint's kernels, split
    assert engine.generate(ids, params) == expected


def test_cli_run_kept_quantized_smollm2(smollm2_gguf):
    """`llm run --tp 2` on the default model (Q4_1 kept quantized) answers exactly as one process."""
    cmd = [sys.executable, "-m", "llmcli", "run", "What is the capital of France?", "-t", "0", "--max-tokens", "12"]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*cmd, "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and "Paris" in two.stdout


# ---- errors and process hygiene -------------------------------------------------------------------------------


def test_heads_that_cannot_be_split(tiny_model):
    from llmcli.config import load_config

    cfg = load_config(tiny_model("llama"))  # 4 query heads, 2 KV heads
    with pytest.raises(UserError, match="2 KV heads .* cannot be shared by 3 ranks"):
        plan(cfg, 3)
    shares = plan(cfg, 4)  # replicated: each KV head on two ranks, one query head each
    assert [s.kv_heads for s in shares] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [rank_config(cfg, s).num_heads for s in shares] == [1, 1, 1, 1]
    assert kv_bytes_per_token(rank_config(cfg, shares[0]), 4) * 2 == kv_bytes_per_token(cfg, 4)


def test_more_ranks_than_gpus_and_missing_backend(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="needs 2 GPUs; this machine has 1"):
        tp.start_group(2, "cuda")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(UserError, match="NCCL"):
        tp.start_group(2, "cuda")


def test_nf4_is_refused():
    with torch.device("meta"):
        layer = NF4Linear(64, 64, [64])
    with pytest.raises(UserError, match="cannot split NF4Linear"):
        take_rows(layer, torch.arange(8))
    with pytest.raises(UserError, match="cannot split Conv1d"):
        take_rows(nn.Conv1d(2, 2, 1), torch.arange(1))


CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from llmcli.engine import tp
    from llmcli.engine.sampling_params import SamplingParams
    if __name__ == "__main__":
        engine = tp.load_engine(sys.argv[1], 2, "cpu", torch.float32, tokenizer=False)
        engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))
        print(" ".join(str(p.pid) for p in tp._GROUP.procs), flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited (a zombie waits only for its new parent to reap it)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_no_orphan_workers(how, tiny_model, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(script), str(tiny_model("llama")), how], capture_output=True, text=True, env=env
    )
    assert r.returncode == (-signal.SIGKILL if how == "kill" else 0), r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 15
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in pids)
