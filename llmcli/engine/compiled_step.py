"""A compiled batch-1 decode step (torch.compile with Inductor) over static, bucketed inputs, whose compiled
artifacts are kept on disk in the llmcli home.

Every input of the step is a tensor whose shape depends only on the context bucket (a power of two of keys, at
least MIN_BUCKET): the token id [1, 1], its position [1, 1], its cache slot [1], the block table padded with the
runner's scratch block to bucket / block_size entries [1, n], and the key mask [1, 1, 1, bucket] (key position <=
query position). Positions and lengths are tensors, never Python ints, so the graph does not specialize on them,
and the key dimension is marked dynamic, so every bucket runs the same graph: a long chat compiles once, not once
per token or per bucket. The cache write (index_copy_) and the block gather happen inside the graph, exactly as the
eager batched path does them (llmcli.layers.attention).

The same static step is what a GPU would capture as a CUDA graph, one per (batch size, bucket), as nano-vllm's
ModelRunner.capture_cudagraph does (padded block tables, fixed input buffers, replay): not done here, no GPU.

Artifacts: torch.compiler's portable cache (save_cache_artifacts / load_cache_artifacts) in one file per key under
`<llmcli home>/compiled/`; the key hashes the model file (path, size, mtime), the model's dims and dtype, the KV
block size, torch's version, the CPU's capability and the thread count (Inductor builds its OpenMP loops for it),
so a second start of the same model loads what the first compiled instead of running Inductor and gcc again (it
still traces the model: see the README, "CPU decode")."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmcli.layers.attention import AttentionMetadata, KVView
from llmcli.paths import llmcli_home, temp_path

MIN_BUCKET = 256  # keys: smaller contexts pad to this (one short graph input, no recompile below it)


@dataclass
class CompileEvent:
    """What the step reports while it compiles (the CLI renders it; the library never prints).

    kind: "start" (compiling or loading the compiled step; cached says whether artifacts were found on disk) or
    "done" (seconds: how long the first call took, trace and compile included)."""

    kind: str
    cached: bool
    seconds: float = 0.0


def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels dispatch on (AVX2, AVX512, ...): compiled code is built for it."""
    return str(torch.backends.cpu.get_cpu_capability())


def cache_key(model_path: Path | str | None, model: nn.Module, block_size: int, dtype: torch.dtype) -> str:
    """A name for the compiled artifacts of this model, shapes, torch version and CPU."""
    c = model.config
    parts = [torch.__version__, cpu_capability(), str(torch.get_num_threads()), str(dtype), str(block_size)]
    parts += [str(v) for v in (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size)]
    if model_path is not None:
        p = Path(model_path).resolve()
        st = p.stat()
        parts += [str(p), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def artifacts_path(key: str) -> Path:
    return llmcli_home() / "compiled" / f"decode-{key}.bin"


def supported(model: nn.Module, windows: list, kv_storage: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the compiled step covers this model: full attention with rope (no sliding window, ALiBi or MLA
    latent cache) and a KV cache in the compute dtype. Other models decode eagerly."""
    c = model.config
    return not c.is_mla and c.position_embedding == "rope" and windows == [None] and kv_storage == dtype


class CompiledDecodeStep:
    """Runs batch-1, one-token decode steps through one compiled graph (see the module docstring); the first call
    compiles it (or loads what an earlier run compiled) and runs it."""

    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        scratch_block: int,
        max_blocks: int,
        artifacts: Path | None = None,
        on_event: Callable[[CompileEvent], None] | None = None,
    ):
        self.model, self.block_size, self.scratch_block = model, block_size, scratch_block
        self.max_blocks = max_blocks
        self.artifacts, self.on_event = artifacts, on_event
        self.ready = False  # the graph has run once (compiled or loaded)
        self.fn = None

    def _step(self, ids, positions, slots, tables, mask) -> torch.Tensor:
        view = KVView(tables, 0, tables.shape[1] * self.block_size, mask)
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, views={None: view})
        return self.model(ids, meta)

    def bucket_blocks(self, length: int) -> int:
        """Blocks of the padded table for a context of `length` keys: a power of two of keys, >= MIN_BUCKET."""
        keys = max(MIN_BUCKET, 1 << (length - 1).bit_length())
        return min(-(-keys // self.block_size), self.max_blocks)

    def inputs(self, token: int, pos: int, table: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The step's tensors for the token at position `pos` whose sequence holds blocks `table`."""
        bs = self.block_size
        n = self.bucket_blocks(pos + 1)
        padded = table[: -(-(pos + 1) // bs)]
        padded = padded + [self.scratch_block] * (n - len(padded))
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[pos]], device=device)
        slots = torch.tensor([padded[pos // bs] * bs + pos % bs], device=device)
        tables = torch.tensor([padded], device=device)
        mask = (torch.arange(n * bs, device=device) <= pos).view(1, 1, 1, -1)
        torch._dynamo.mark_dynamic(tables, 1)
        torch._dynamo.mark_dynamic(mask, 3)
        return ids, positions, slots, tables, mask

    def __call__(self, token: int, pos: int, table: list[int], device: torch.device) -> torch.Tensor:
        """Hidden states [1, 1, hidden] of `token` at `pos` (its K/V written to the cache)."""
        args = self.inputs(token, pos, table, device)
        return self.fn(*args) if self.ready else self._compile(args)

    def _compile(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        cached = self.artifacts is not None and self.artifacts.is_file()
        self._emit(CompileEvent("start", cached))
        t0 = time.perf_counter()
        if cached:
            torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        self.fn = torch.compile(self._step)  # dynamic: the dims inputs() marks
        with warnings.catch_warnings():  # Inductor's note on fusing the fp16 embedding row with bf16 kernels' casts
            warnings.filterwarnings("ignore", "bf16 and fp16 are mixed", UserWarning)
            out = self.fn(*args)
        if self.artifacts is not None and not cached:
            self._save()
        self.ready = True
        self._emit(CompileEvent("done", cached, time.perf_counter() - t0))
        return out

    def _save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        data, _ = saved
        self.artifacts.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(self.artifacts)
        tmp.write_bytes(data)
        os.replace(tmp, self.artifacts)

    def _emit(self, event: CompileEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
