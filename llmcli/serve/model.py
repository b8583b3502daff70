"""ServedModel: the one model `llm serve` serves, loaded in a background thread while HTTP already answers.

Until it is ready every inference route answers 503 (and /health too). A failed load is logged with its one-line
reason and stops the server (on_failure); `llm serve` then exits with that error.

With --tensor-parallel N the load thread starts the N - 1 worker processes (llmcli.engine.tp); the engine thread
then drives rank 0's runner, which broadcasts every step to them. shutdown() stops them after the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.engine import async_engine, tp
from llmcli.engine.llm_engine import LLMEngine
from llmcli.errors import UserError
from llmcli.serve.errors import APIError
from llmcli.serve.grammar import Grammars

log = logging.getLogger("uvicorn.error")  # uvicorn's logger: the server's lines share its format and handler


@dataclass
class EngineLimits:
    """The scheduler's limits (the --max-num-seqs, --max-num-batched-tokens and --max-queue flags)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_queue: int = 64


@dataclass
class LoadOptions:
    """How the model is loaded (the device, dtype and KV-cache flags of `llm run`)."""

    device: str | None = None
    dtype: str | None = None
    kv_cache_gib: float | None = None
    dequantize: bool = False
    kv_dtype: str | None = None
    tensor_parallel: int = 1
    compile: str = "auto"  # --compile: batch-1 decode steps (one request in flight) through the compiled graph


@dataclass
class ServedModel:
    path: Path
    name: str  # what /v1/models and /api/tags list, and what requests name in "model"
    load: LoadOptions = field(default_factory=LoadOptions)
    limits: EngineLimits = field(default_factory=EngineLimits)
    llm: LLMEngine | None = None
    engine: async_engine.AsyncEngine | None = None
    grammars: Grammars | None = None
    error: str | None = None
    load_s: float = 0.0
    loaded_at: float = 0.0
    _thread: threading.Thread | None = None
    _shutdown: asyncio.Task | None = None
    on_failure: Callable[[], None] | None = None  # called from the load thread when loading failed (the server stops)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="llm-serve-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            o, lim = self.load, self.limits
            llm = tp.load_engine(
                self.path,
                o.tensor_parallel,
                o.device,
                o.dtype,
                kv_cache_gib=o.kv_cache_gib,
                dequantize=o.dequantize,
                kv_dtype=o.kv_dtype,
                max_batch=lim.max_num_seqs,
            )
            llm.set_compile(o.compile)
            if llm.tokenizer is None:
                raise UserError(f"{self.path} has no tokenizer; the server needs one")
            self.grammars = Grammars(llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)
            engine = async_engine.AsyncEngine(
                llm,
                max_num_seqs=lim.max_num_seqs,
                max_num_batched_tokens=lim.max_num_batched_tokens,
                max_queue=lim.max_queue,
            )
            engine.start()
            self.llm, self.load_s, self.loaded_at = llm, time.perf_counter() - t0, time.time()
            self.engine = engine  # last: `ready` turns true only once everything above is in place
            ranks = f", {o.tensor_parallel} tensor-parallel ranks" if o.tensor_parallel > 1 else ""
            log.info("model %s loaded in %.1f s (%s%s)", self.name, self.load_s, llm.device, ranks)
        except Exception as e:  # noqa: BLE001 - any load failure is reported by /health and the routes, not raised
            self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.path, self.error)
            if self.on_failure is not None:
                self.on_failure()

    def require(self) -> tuple[LLMEngine, async_engine.AsyncEngine]:
        """The engine, or a 503 while it loads (or when loading failed)."""
        if self.engine is None or self.llm is None:
            why = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, why)
        return self.llm, self.engine

    def check_name(self, requested: str | None) -> None:
        """404 for a model name this server does not serve (the name, or Ollama's name:latest)."""
        if requested not in (self.name, f"{self.name}:latest"):
            raise APIError(
                404, f"model {requested!r} not found (this server serves {self.name!r})", "model", "model_not_found"
            )

    def begin_shutdown(self, grace_s: float) -> asyncio.Task | None:
        """Start the engine's shutdown (no new requests; in-flight ones get grace_s, then are aborted, which ends
        their streams) on the running loop; the same task on every call. None while nothing is loaded."""
        if self._shutdown is None and self.engine is not None:
            self._shutdown = asyncio.ensure_future(self.engine.shutdown(grace_s=grace_s))
        return self._shutdown

    async def shutdown(self, grace_s: float) -> None:
        task = self.begin_shutdown(grace_s)
        if task is not None:
            await task
        if self.load.tensor_parallel > 1 and not (self._thread and self._thread.is_alive()):
            # the engine thread has stopped: tell the workers to stop and wait for them (a load still under way
            # is left to the exit hook, which kills the workers it strands in a collective)
            await asyncio.to_thread(tp.shutdown)
