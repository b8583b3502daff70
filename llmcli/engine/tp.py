"""Tensor parallelism: N processes each hold a share of the model; rank 0 runs the engine, the others follow it.

    engine = load_engine(path, tensor_parallel=2, device="cpu")   # an LLMEngine whose runner drives 2 ranks

Rank 0 is the calling process: it tokenizes, schedules (block manager), samples, and owns the only full LLMEngine.
Each model-runner call it makes (forward of a batch, copy_blocks) is first broadcast to the other ranks as plain
data (each sequence's new token ids, its [start, end) and block table), which rebuild the same batch and run the
same ModelRunner.forward over their own shard and KV cache; the all-reduces inside the model keep them in step.
Every rank loads the whole checkpoint and then cuts it to its share (llmcli.engine.tp_shard), so host memory
peaks at one full copy per rank while loading: fine for small models, not for ones that only fit split.

Processes: on one machine `load_engine` spawns the N - 1 workers itself (torch.multiprocessing, spawn), gloo over
127.0.0.1 on a free port for CPU, NCCL with one GPU per rank for CUDA. Under torchrun (RANK / WORLD_SIZE set),
the group torchrun made is used instead and ranks other than 0 turn into followers inside load_engine. Commands
travel over a separate gloo group with a long timeout, so a worker can wait for the next step as long as an idle
chat lasts; workers exit when rank 0 says stop, when its connection breaks, or when their parent process is gone.
On CPU the torch threads are divided between the ranks of this machine.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmcli.config import ModelConfig, load_config
from llmcli.engine.llm_engine import LLMEngine, resolve_device, resolve_dtype
from llmcli.engine.loader import load_model
from llmcli.engine.model_runner import ModelRunner
from llmcli.engine.tp_shard import shard_model
from llmcli.errors import UserError
from llmcli.estimate.tensor_parallel import plan
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.tokenizer import load_tokenizer

COMMAND_TIMEOUT = timedelta(days=365)  # a follower waits for rank 0's next step as long as a session lasts
JOIN_TIMEOUT_S = 10.0
# The model group's limit: rendezvous (a worker that failed to start is noticed after this) and each all-reduce,
# which only waits for the slowest rank of a step
GROUP_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class LoadSpec:
    """What every rank needs to load its share (sent from rank 0 to the others)."""

    path: str
    dtype: torch.dtype
    dequantize: bool
    block_size: int
    kv_cache_gib: float | None
    max_batch: int
    kv_dtype: str | None = None


# ---- the process group -------------------------------------------------------------------------------------------


def _backend(device_type: str) -> str:
    if not dist.is_available():
        raise UserError("--tensor-parallel needs torch.distributed, which this torch build lacks")
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise UserError("--tensor-parallel on CUDA needs the NCCL backend, which this torch build lacks")
        return "nccl"
    if not dist.is_gloo_available():
        raise UserError("--tensor-parallel on CPU needs the gloo backend, which this torch build lacks")
    return "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cpu_threads(local_world: int) -> int:
    """Each rank's share of this machine's torch threads (at least one)."""
    return max(1, torch.get_num_threads() // local_world)


class TPGroup:
    """The ranks of one tensor-parallel run, seen from one process: its rank, the command channel, and (rank 0 on
    one machine) the worker processes it started."""

    def __init__(self, rank: int, world: int, device: torch.device, procs: list | None = None):
        self.rank, self.world, self.device = rank, world, device
        self.procs = procs or []
        self.commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
        self.closed = False
        # rank 0 is inside an exchange (a step, a load): if it stops there (Ctrl-C, an error) the followers wait in a
        # collective and can hear no command, so close() kills them instead
        self.busy = False

    def send(self, *command) -> None:
        """Rank 0: broadcast a command to every follower (a worker that died turns into a one-line error)."""
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise UserError(f"a tensor-parallel worker exited (code {dead[0].exitcode}); the run cannot go on")
        try:
            dist.broadcast_object_list([command], src=0, group=self.commands)
        except RuntimeError as e:
            raise UserError(f"lost a tensor-parallel worker: {str(e).splitlines()[0]}") from None

    def receive(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def all_gather(self, value) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, value, group=self.commands)
        return out

    def close(self) -> None:
        """Leave the group together: rank 0 tells the followers to stop, all meet at a barrier, rank 0 waits for the
        processes it started."""
        if self.closed:
            return
        self.closed = True
        if self.busy:  # interrupted mid-step: the followers cannot hear a command any more
            for p in self.procs:
                p.kill()
        try:
            if not self.busy and (self.rank != 0 or all(p.is_alive() for p in self.procs)):
                if self.rank == 0:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.commands)
                # no rank tears its connections down while another still uses them (gloo aborts on that)
                dist.barrier(group=self.commands)
        except RuntimeError:
            pass  # a follower already gone: nothing to tell it
        for p in self.procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def _torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) when this process was started by torchrun (or another env:// launcher)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return None


def torchrun_follower() -> bool:
    """This process is a rank other than 0 of a torchrun launch: it only follows rank 0 (load_engine never returns
    there; a command that does more than load, like `llm serve`, must not do the rest)."""
    launched = _torchrun_world()
    return launched is not None and launched[0] != 0


def start_group(world: int, device_type: str) -> TPGroup:
    """This process's TPGroup, with SIGINT blocked in the communication threads it starts (they inherit the mask;
    Ctrl-C then reaches the main thread only, between steps)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return _start_group(world, device_type)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _start_group(world: int, device_type: str) -> TPGroup:
    """torchrun's ranks if it launched us, else rank 0 of `world` local processes (it spawns the other world - 1)."""
    backend = _backend(device_type)
    launched = _torchrun_world()
    if launched is not None:
        rank, size, local_rank = launched
        if size != world:
            raise UserError(
                f"--tensor-parallel {world} but torchrun started {size} processes (--nproc-per-node x --nnodes)"
            )
        device = _rank_device(device_type, local_rank)
        if device_type == "cpu":
            torch.set_num_threads(_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
        return TPGroup(rank, world, device)
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise UserError(f"--tensor-parallel {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    threads = _cpu_threads(world)
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(r, world, init, device_type, threads, os.getpid()), daemon=True)
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    if device_type == "cpu":
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init, rank=0, world_size=world, timeout=GROUP_TIMEOUT)
    return TPGroup(0, world, _rank_device(device_type, 0), procs)


# ---- every rank: load a share ------------------------------------------------------------------------------------


def _load_share(group: TPGroup, spec: LoadSpec):
    """Load the whole model on this rank's device, cut it to this rank's share, agree on the KV pool size.
    Returns (model, this rank's config, blocks every rank allocates); any rank's UserError is raised on all."""
    error, model, cfg, blocks = None, None, None, 0
    try:
        model, full = load_model(spec.path, group.device, spec.dtype, dequantize=spec.dequantize)
        cfg = shard_model(model, full, group.rank, group.world)
        blocks = _pool_blocks(model, cfg, spec)
    except UserError as e:
        error = str(e)
    results = group.all_gather((error, blocks))
    group.busy = False  # every rank is past the exchange
    errors = [e for e, _ in results if e]
    if errors:
        raise UserError(errors[0])
    return model, cfg, min(b for _, b in results)


def _pool_blocks(model, cfg: ModelConfig, spec: LoadSpec) -> int:
    """The KV pool this rank could afford, by the engine's own rule (budget per device, this rank's KV heads)."""
    probe = LLMEngine.__new__(LLMEngine)
    p = model.model.norm.weight
    probe.config, probe.device, probe.dtype, probe.kv_dtype = cfg, p.device, p.dtype, spec.kv_dtype
    return probe._pool_blocks(spec.block_size, spec.kv_cache_gib, spec.max_batch, split_windows=False)


# ---- followers ---------------------------------------------------------------------------------------------------


class _StepSequence:
    """What ModelRunner.forward reads of a sequence, rebuilt from rank 0's step: token_ids[start:end] and the
    block table (the ids before `start` are never read, so they are not sent)."""

    def __init__(self, ids: list[int], start: int, block_table: list[int]):
        self.token_ids = _OffsetIds(ids, start)
        self.block_table = block_table


class _OffsetIds:
    def __init__(self, ids: list[int], start: int):
        self.ids, self.start = ids, start

    def __getitem__(self, s: slice) -> list[int]:
        return self.ids[s.start - self.start : s.stop - self.start]


def cache_bytes(runner: ModelRunner) -> int:
    """Bytes of a runner's KV pool (every layer, the scratch block included)."""
    return sum(c.numel() * c.element_size() for c in runner.caches + runner.scales if c is not None)


def follow(group: TPGroup) -> None:
    """A follower's loop: load shares and run rank 0's steps until told to stop."""
    runner: ModelRunner | None = None
    while True:
        command = group.receive()
        kind = command[0]
        if kind == "stop":
            return
        if kind == "load":
            runner = None  # the previous model's memory goes before the next one loads
            try:
                model, cfg, blocks = _load_share(group, command[1])
            except UserError:
                continue  # rank 0 raises it for everyone
            runner = ModelRunner(model, cfg, blocks, command[1].block_size, command[1].kv_dtype)
        elif kind == "forward":
            runner.forward([(_StepSequence(ids, s, table), s, e) for ids, s, e, table in command[1]])
        elif kind == "copy_blocks":
            runner.copy_blocks(command[1])
        elif kind == "kv_bytes":
            group.all_gather(cache_bytes(runner))


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that spawned this worker is gone (killed rank 0 must not leave orphans)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def worker_main(rank: int, world: int, init: str, device_type: str, threads: int, parent_pid: int) -> None:
    """Entry point of a spawned follower."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops the workers
    if device_type == "cpu":
        torch.set_num_threads(threads)
    device = _rank_device(device_type, rank)
    dist.init_process_group(_backend(device_type), init_method=init, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    group = TPGroup(rank, world, device)
    try:
        follow(group)
    except (RuntimeError, ConnectionError):  # rank 0's connection broke: nothing left to follow
        os._exit(1)
    group.close()


# ---- rank 0 ------------------------------------------------------------------------------------------------------


class TPRunner:
    """Rank 0's model runner: sends each call to the followers, then runs it on its own shard. Everything else
    (caches, block size, device) is the wrapped ModelRunner's."""

    def __init__(self, inner: ModelRunner, group: TPGroup):
        self.inner, self.group = inner, group

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def forward(self, batch: list) -> torch.Tensor:
        bs = self.inner.block_size
        step = [(seq.token_ids[s:e], s, e, seq.block_table[: -(-e // bs)]) for seq, s, e in batch]
        # Ctrl-C waits for the step's end: a rank leaving mid-step would strand the others in an all-reduce
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.group.busy = True
            self.group.send("forward", step)
            hidden = self.inner.forward(batch)
            self.group.busy = False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return hidden

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self.group.send("copy_blocks", list(copies))
        self.inner.copy_blocks(copies)

    def kv_bytes_per_rank(self) -> list[int]:
        """The KV pool each rank allocated, rank 0 first (what `llm estimate --tensor-parallel` predicts)."""
        self.group.busy = True
        self.group.send("kv_bytes")
        sizes = self.group.all_gather(cache_bytes(self.inner))
        self.group.busy = False
        return sizes


_GROUP: TPGroup | None = None


def _group(world: int, device_type: str) -> TPGroup:
    """The process's one TPGroup (started on first use, closed at exit); later loads reuse its workers."""
    global _GROUP
    if _GROUP is not None and (_GROUP.closed or _GROUP.world != world or _GROUP.device.type != device_type):
        raise UserError("a tensor-parallel group of another size or device is already running in this process")
    if _GROUP is None:
        _GROUP = start_group(world, device_type)
        atexit.register(_GROUP.close)
        if _GROUP.rank != 0:  # torchrun: this process only follows rank 0, then the command is done
            follow(_GROUP)
            _GROUP.close()
            sys.exit(0)
    return _GROUP


def shutdown() -> None:
    """Stop the workers of this process's group (tests; the CLI relies on the exit hook)."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close()
        _GROUP = None


def check_split(path: str | Path, tensor_parallel: int) -> None:
    """UserError when the model's heads cannot be split over `tensor_parallel` ranks (reads only the config)."""
    config = load_gguf_config(path) if is_gguf(path) else load_config(path)
    plan(config, tensor_parallel)


def load_engine(
    path: str | Path,
    tensor_parallel: int = 1,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    kv_cache_gib: float | None = None,
    block_size: int = 16,
    tokenizer: bool = True,
    dequantize: bool = False,
    max_batch: int = 1,
    kv_dtype: str | None = None,
) -> LLMEngine:
    """LLMEngine.load, split over `tensor_parallel` ranks (1: exactly LLMEngine.load). engine.config is the whole
    model's, engine.runner.config rank 0's share (its heads and MLP widths); the KV budget (--kv-cache-gib, CUDA's
    free memory) is per device."""
    kv_dtype = None if kv_dtype == "auto" else kv_dtype
    kw = dict(
        kv_cache_gib=kv_cache_gib, block_size=block_size, dequantize=dequantize, max_batch=max_batch, kv_dtype=kv_dtype
    )
    if tensor_parallel == 1:
        return LLMEngine.load(path, device, dtype, tokenizer=tokenizer, **kw)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.float16:
        raise UserError("float16 is not supported on CPU; use float32 or bfloat16")
    check_split(path, tensor_parallel)  # heads that cannot be split: said before any process starts
    group = _group(tensor_parallel, dev.type)
    spec = LoadSpec(str(path), dt, dequantize, block_size, kv_cache_gib, max_batch, kv_dtype)
    group.busy = True  # interrupted while loading: the followers are in a collective, close() kills them
    group.send("load", spec)
    model, cfg, blocks = _load_share(group, spec)
    tok = load_tokenizer(path, cfg.vocab_size) if tokenizer else None
    engine = LLMEngine(model, cfg, tok, block_size=block_size, num_blocks=blocks, kv_dtype=kv_dtype)
    engine.config = model.config  # the whole model's (parameter counts, context); the runner keeps rank 0's share
    engine.runner = TPRunner(engine.runner, group)
    return engine
