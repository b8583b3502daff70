"""AsyncEngine: one thread owns the model and runs scheduler steps; asyncio callers submit requests and read
their tokens as they are sampled (the bridge `llm serve` is built on).

    engine = AsyncEngine(LLMEngine.load(path), max_num_seqs=16, max_num_batched_tokens=256, max_queue=64)
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(...), n=1, logprobs=None, constraint_factory=None)
    async for ev in handle:          # TokenEvent, in sampling order; ends when every sample has finished
        ...
    handle.abort()                   # thread-safe; the samples leave the batch at the next step, blocks freed
    engine.stats()                   # EngineStats, for /metrics and /api/ps
    await engine.shutdown(grace_s=5) # stop accepting, finish in-flight requests within grace_s, abort the rest

Contract shared by the engine side (scheduler, this module) and the server side (llmcli/serve): the names and
fields below are what llmcli.serve codes against.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from dataclasses import dataclass

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.scheduler import (
    ConstraintFactory,
    Emitted,
    Request,
    Scheduler,
    TokenConstraint,
    TokenEvent,
    check_request,
)

__all__ = ["AsyncEngine", "ConstraintFactory", "EngineStats", "QueueFull", "RequestHandle", "TokenConstraint",
           "TokenEvent"]  # fmt: skip


class QueueFull(RuntimeError):
    """More requests are waiting than max_queue allows (the server answers 503)."""


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_tokens: int = 0  # cumulative: prompt tokens found in the prefix cache
    prompt_tokens: int = 0  # cumulative: prompt tokens of admitted requests
    generation_tokens: int = 0  # cumulative
    preemptions: int = 0  # cumulative


_DONE = object()  # the handle's queue ends with this after the request's last event


class RequestHandle:
    """One request's stream of TokenEvents (async iteration, in sampling order) and its abort switch."""

    def __init__(self, engine: AsyncEngine, request: Request, loop: asyncio.AbstractEventLoop):
        self._engine, self.request, self._loop = engine, request, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.num_prompt_tokens = len(request.prompt_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache (known once the request's prompt started: its first event)."""
        return self.request.num_cached_tokens

    def abort(self, index: int | None = None) -> None:
        """End every sample (or sample `index`) at the engine's next step; thread-safe, idempotent."""
        self._engine._post(("abort", self, index))

    def _push(self, events: list[TokenEvent], done: bool, error: BaseException | None = None) -> None:
        for ev in events:
            self._queue.put_nowait(ev)
        if error is not None:
            self._queue.put_nowait(error)
        if done or error is not None:
            self._queue.put_nowait(_DONE)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._queue.get()
        if item is _DONE:
            self._queue.put_nowait(_DONE)  # iterating again ends at once too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    """The engine thread (it alone touches the model and the KV pool) and the asyncio-facing API."""

    def __init__(self, engine: LLMEngine, max_num_seqs: int = 16, max_num_batched_tokens: int = 512, max_queue=64):
        self.engine = engine
        self.scheduler = Scheduler(engine, max_num_seqs, max_num_batched_tokens)
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: dict[int, RequestHandle] = {}  # id(request) -> handle, until its last event is delivered
        self._queued = 0  # submitted requests whose prompt has not started
        self._stats = EngineStats(kv_blocks_total=len(engine.block_manager.blocks))
        self._thread: threading.Thread | None = None
        self._accepting = True

    # ---- the asyncio side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        logprobs: int | None = None,
        constraint_factory: ConstraintFactory | None = None,
    ) -> RequestHandle:
        """Queue a request; call from the event loop that reads the handle. UserError for a prompt past the
        context (both numbers), QueueFull when too many requests wait or the engine is shutting down."""
        self.engine.check_prompt(prompt_ids, params)
        check_request(n, logprobs)
        req = Request(list(prompt_ids), params, n, logprobs, constraint_factory)
        handle = RequestHandle(self, req, asyncio.get_running_loop())
        with self._lock:
            if not self._accepting or self._thread is None:
                raise QueueFull("the engine is not accepting requests (shutting down)")
            free_slots = max(0, self.scheduler.max_num_seqs - self._stats.running)
            if self._queued - free_slots >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (at most {self.max_queue})")
            self._queued += 1
            self._live[id(req)] = handle
        self._post(("submit", handle, None))
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let running requests finish for up to grace_s; abort the rest; join the thread."""
        with self._lock:
            self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._thread is not None:
            self._post(("stop", None, None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _post(self, cmd: tuple) -> None:
        self._inbox.put(cmd)

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        sched = self.scheduler
        while True:
            cmds = [self._inbox.get()] if not sched.has_work() else []  # idle: sleep on the queue
            while True:
                try:
                    cmds.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            emitted, stop = self._apply(cmds)
            if stop:
                emitted += sched.abort_all()
                self._update_stats()  # before delivering: a reader that saw its last event sees these stats
                self._deliver(emitted)
                return
            try:
                if sched.has_work():
                    emitted += sched.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends every request with the error, not the thread
                self._fail_all(e)
            self._update_stats()
            self._deliver(emitted)

    def _apply(self, cmds: list[tuple]) -> tuple[Emitted, bool]:
        emitted, stop = [], False
        for kind, handle, index in cmds:
            if kind == "stop":
                stop = True
            elif kind == "submit":
                try:
                    emitted += self.scheduler.add(handle.request)
                except Exception as e:  # noqa: BLE001 - submit() checked it; anything left goes to its reader
                    self._fail(handle, e)
            elif kind == "abort" and id(handle.request) in self._live and not handle.request.finished:
                emitted += self.scheduler.abort(handle.request, index)
        return emitted, stop

    def _deliver(self, emitted: Emitted) -> None:
        """One call_soon_threadsafe per request per step: its events, and the end when its last sample finished."""
        by_req: dict[int, tuple[Request, list[TokenEvent]]] = {}
        for req, ev in emitted:
            by_req.setdefault(id(req), (req, []))[1].append(ev)
        for key, (req, events) in by_req.items():
            with self._lock:
                handle = self._live.pop(key, None) if req.finished else self._live.get(key)
            if handle is not None:
                handle._loop.call_soon_threadsafe(handle._push, events, req.finished)

    def _fail(self, handle: RequestHandle, error: BaseException) -> None:
        with self._lock:
            self._live.pop(id(handle.request), None)
        handle.request.num_finished = handle.request.n
        handle._loop.call_soon_threadsafe(handle._push, [], True, error)

    def _fail_all(self, error: BaseException) -> None:
        self.scheduler.abort_all()  # frees every block; the readers get the error instead of abort events
        with self._lock:
            handles = list(self._live.values())
        for handle in handles:
            self._fail(handle, error)

    def _update_stats(self) -> None:
        sched, bm = self.scheduler, self.engine.block_manager
        c = sched.counters
        with self._lock:
            self._queued = sum(1 for h in self._live.values() if not h.request.admitted)
            self._stats = EngineStats(
                running=len(sched.running),
                waiting=len(sched.waiting),
                kv_blocks_used=len(bm.blocks) - len(bm.free),  # the first layer group's pool (full attention)
                kv_blocks_total=len(bm.blocks),
                prefix_cache_hit_tokens=c.prefix_cache_hit_tokens,
                prompt_tokens=c.prompt_tokens,
                generation_tokens=c.generation_tokens,
                preemptions=c.preemptions,
            )
