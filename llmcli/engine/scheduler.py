"""Scheduler: continuous batching of served requests over one LLMEngine's model and KV pool.

Each step computes the next token of every running sequence (one [B, 1] decode forward) and, within the token
budget left (max_num_batched_tokens), chunks of prompts (each chunk its own batch-1 forward, so decode rows are
never padded to a chunk's length and a long prompt never stalls the running streams: while streams decode, a
chunk is sized from the measured cost of both forwards, see step_cost.py). A request's n samples
share its prompt's blocks (forked when the prompt is done; a shared partial block is copied on first write).
When the pool runs out, the newest running sequence is preempted by recompute: its blocks go back to the pool
(still keyed for the prefix cache), it returns to the front of the waiting queue with its generated tokens, and
continues later from where it was, nothing lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from llmcli.engine.sampler import sample
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.sequence import Sequence
from llmcli.engine.step_cost import StepCost
from llmcli.errors import UserError

if TYPE_CHECKING:  # the engine runs generate() on a Scheduler: a runtime import would be circular
    from llmcli.engine.llm_engine import LLMEngine

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
# A decode batch pads every row's keys to the longest row's. Rows are split into another forward when that saves
# more padded key rows than this: one more forward costs a pass over the weights, ~12 ms for SmolLM2 on CPU, about
# what 1,400 padded key rows cost in the gather and attention (8.7 us each, benchmarks/batched_decode.py).
PAD_SPLIT_TOKENS = 2048


class TokenConstraint(Protocol):
    """Grammar-constrained decoding for one sample (llmcli.serve.grammar implements it with llguidance)."""

    def fill_mask(self, logits: torch.Tensor) -> None:
        """Set the entries of this sample's [vocab] logits row that the grammar forbids to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance the grammar by the sampled token."""

    def is_finished(self) -> bool:
        """The grammar is complete: the sample ends (finish_reason "stop")."""


ConstraintFactory = Callable[[], TokenConstraint]


@dataclass
class TokenEvent:
    index: int  # which of the request's n samples
    token_id: int  # -1 on an "abort" event: the sample left without a new token
    logprob: float | None = None  # log-softmax of the raw model logits at the sampled id (when logprobs asked)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the `logprobs` most likely (id, logprob)
    finish_reason: str | None = None  # set on a sample's last event: "stop" | "length" | "abort"


@dataclass(eq=False)
class Request:
    """One submitted request: its prompt, sampling, and the state of its n samples."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    logprobs: int | None = None
    constraint_factory: ConstraintFactory | None = None
    admitted: bool = False  # its prompt started (left the waiting queue the first time)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    forked: bool = False
    samples: list[Sequence] = field(default_factory=list)
    aborted: set[int] = field(default_factory=set)  # sample indices aborted (forked later ones never start)
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished >= self.n


@dataclass
class SchedulerCounters:
    prefix_cache_hit_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0


def check_request(n: int, logprobs: int | None) -> None:
    if n < 1:
        raise UserError(f"n must be at least 1 (got {n})")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise UserError(f"logprobs must be from 0 to {MAX_LOGPROBS} (got {logprobs})")


Emitted = list[tuple[Request, TokenEvent]]


class Scheduler:
    def __init__(self, engine: LLMEngine, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise UserError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.engine, self.bm, self.runner = engine, engine.block_manager, engine.runner
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()
        self.pad_split_tokens = PAD_SPLIT_TOKENS
        self.cost = StepCost(measured=engine.device.type == "cpu")  # CUDA forwards are asynchronous: not timed

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests -----------------------------------------------------------------------------
    def add(self, req: Request) -> Emitted:
        """Queue a request (UserError for a prompt past the context). A request for no tokens ends at once."""
        self.engine.check_prompt(req.prompt_ids, req.params)
        check_request(req.n, req.logprobs)
        if req.params.max_tokens == 0:
            req.admitted, req.num_finished = True, req.n
            return [(req, TokenEvent(i, -1, finish_reason="length")) for i in range(req.n)]
        self.waiting.append(self._new_sample(req, 0, list(req.prompt_ids)))
        return []

    def _new_sample(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(token_ids, req.params, num_prompt_tokens=len(req.prompt_ids), index=index, request=req)
        if req.params.seed is not None:  # sample i draws from seed + i: reproducible, and distinct per sample
            seq.generator = torch.Generator(self.engine.device).manual_seed((req.params.seed + index) % 2**64)
        if req.constraint_factory is not None:
            seq.constraint = req.constraint_factory()
        req.samples.append(seq)
        return seq

    def abort(self, req: Request, index: int | None = None) -> Emitted:
        """End the request's samples (all, or sample `index`): their blocks are freed now, each gets a last event
        with finish_reason "abort". Samples not forked yet are marked so they never start."""
        wanted = set(range(req.n)) if index is None else {index} & set(range(req.n))
        done = {s.index for s in req.samples if s.finished}
        indices = wanted - req.aborted - done
        req.aborted |= indices
        for seq in list(req.samples):
            # an unforked sample 0 still computes the prompt for the others; it leaves at the fork
            needed = seq.index == 0 and not req.forked and len(req.aborted) < req.n
            if seq.index in req.aborted and not seq.finished and not needed:
                self._finish(seq, "abort")
        req.num_finished += len(indices)
        return [(req, TokenEvent(i, -1, finish_reason="abort")) for i in sorted(indices)]

    def abort_all(self) -> Emitted:
        reqs = {id(s.request): s.request for s in [*self.running, *self.waiting]}
        return [e for r in reqs.values() for e in self.abort(r)]

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free its blocks (they stay in the prefix cache), back to the front of the queue."""
        self.running.remove(seq)
        self.bm.free_sequence(seq)
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> Emitted:
        """Schedule, run the forwards, sample one token for every sequence whose pending tokens are all computed."""
        decode = self._schedule_decodes()
        chunks = self._schedule_prefills(self._prefill_budget(len(decode)))
        if not decode and not chunks:
            if self.running:  # every running prompt is stuck for blocks: make room by preempting the newest
                self._preempt(self.running[-1])
            return []
        model, rows, logits, clock = self.engine.model, [], [], self.cost.clock
        t0 = clock()
        for group in self._decode_groups(decode):
            hidden = self.runner.forward([(s, len(s) - 1, len(s)) for s in group])
            for s in group:
                self.bm.commit(s, len(s))
            logits.append(model.compute_logits(hidden[:, -1]))
            rows += group
        if decode:
            self.cost.observe_decode(clock() - t0)
        # Each chunk its own forward: grouping 16 prompts of 16-31 tokens into padded forwards measured slower on
        # CPU (1.6-1.9 s vs 1.0-1.4 s for the step), their matmuls are compute-bound already.
        for s, start, end in chunks:
            t0 = clock()
            hidden = self.runner.forward([(s, start, end)])
            if decode:
                self.cost.observe_chunk(clock() - t0, end - start)
            self.bm.commit(s, end)
            if end == len(s):  # the prompt (or its recompute) is done: its last position gives the next token
                logits.append(model.compute_logits(hidden[:, -1]))
                rows.append(s)
        if not rows:
            return []
        rows, logits = self._fork(rows, torch.cat(logits))
        return self._sample(rows, logits) if rows else []

    def _prefill_budget(self, num_decode: int) -> int:
        """Prompt tokens this step may compute. Alone, a prompt takes the whole budget (fastest prefill); while
        streams decode, what costs about one decode forward (StepCost), so the step their next token waits for
        stays near two decode steps (a 2,000-token prompt among 8 streams: their p99 gap 1.1 s -> ~0.1 s)."""
        budget = self.max_num_batched_tokens - num_decode
        if num_decode:
            budget = min(budget, self.cost.chunk_tokens(num_decode))
        return budget

    def _decode_groups(self, decode: list[Sequence]) -> list[list[Sequence]]:
        """Decode rows in forwards of similar lengths: longest first, a new group where the rows left would
        otherwise pad more than pad_split_tokens key rows up to the current group's longest."""
        rows = sorted(decode, key=len, reverse=True)
        groups: list[list[Sequence]] = []
        for i, s in enumerate(rows):
            if groups and (len(groups[-1][0]) - len(s)) * (len(rows) - i) <= self.pad_split_tokens:
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def _schedule_decodes(self) -> list[Sequence]:
        """Running sequences with one pending token, each given room for it; preempts the newest running
        sequences while the pool is short (the sequence itself, when it is the newest)."""
        decode, i = [], 0
        while i < len(self.running):
            s = self.running[i]
            i += 1
            if s.num_computed < len(s) - 1:
                continue  # a prompt being prefilled in chunks
            while not self.bm.can_append(s):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is s:
                    break
            else:
                self.runner.copy_blocks(self.bm.prepare_append(s))
                decode.append(s)
        return decode

    def _schedule_prefills(self, budget: int) -> list[tuple[Sequence, int, int]]:
        """Chunks [start, end) of prompts within the token budget: started prompts first, then waiting ones
        while the running cap and the pool allow."""
        chunks = []
        for s in self.running:
            if budget <= 0:
                break
            if s.num_computed < len(s) - 1:
                end = self._chunk_end(s, budget)
                if end > s.num_computed:
                    chunks.append((s, s.num_computed, end))
                    budget -= end - s.num_computed
        while self.waiting and budget > 0:
            s = self.waiting[0]
            req = s.request
            width = 1 if req.forked or req.n == 1 else req.n  # an unforked prompt brings its n samples
            if self.running and len(self.running) + width > self.max_num_seqs:
                break
            self.bm.match_prefix(s)
            end = self._chunk_end(s, budget)
            if end <= s.num_computed:
                self.bm.free_sequence(s)  # no room: give the matched prefix back, try again next step
                break
            self.waiting.popleft()
            self.running.append(s)
            if not req.admitted:
                req.admitted, req.num_cached_tokens = True, s.num_cached_prompt
                self.counters.prompt_tokens += len(req.prompt_ids)
                self.counters.prefix_cache_hit_tokens += s.num_cached_prompt
            chunks.append((s, s.num_computed, end))
            budget -= end - s.num_computed
        return chunks

    def _chunk_end(self, s: Sequence, budget: int) -> int:
        """Where s's next chunk ends: the budget, the prompt's end and the free blocks allowing (blocks taken)."""
        end = min(len(s), s.num_computed + budget, self.bm.room(s))
        if end > s.num_computed:
            self.bm.ensure_capacity(s, end)
        return end

    def _fork(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Rows of requests whose prompt just finished with n > 1: samples 1..n-1 share sample 0's blocks and
        draw their first token from the same logits. A sample aborted before the fork is dropped here."""
        out, picks = [], []
        for row, s in enumerate(rows):
            req = s.request
            if not req.forked and req.n > 1:
                req.forked = True
                for i in range(1, req.n):
                    if i not in req.aborted:
                        child = self._new_sample(req, i, list(s.token_ids))
                        self.bm.fork(s, child)
                        self.running.append(child)
                        out.append(child)
                        picks.append(row)
                if 0 in req.aborted:
                    self._finish(s, "abort")
                    continue
            out.append(s)
            picks.append(row)
        if picks == list(range(len(rows))):
            return out, logits
        return out, logits[torch.tensor(picks, device=logits.device)]

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> Emitted:
        """Sample one token per row (constraints masked in first), append it, emit its event, end finished ones."""
        ks = [s.request.logprobs for s in rows]
        logprobs = logits.float().log_softmax(-1) if any(k is not None for k in ks) else None
        for row, s in enumerate(rows):
            if s.constraint is not None:
                s.constraint.fill_mask(logits[row])
        params = [s.params for s in rows]
        history = [s.token_ids for s in rows] if any(p.repetition_penalty != 1 for p in params) else None
        extra = any(p.frequency_penalty or p.presence_penalty for p in params)
        outputs = [s.output_ids for s in rows] if extra else None
        ids_t = sample(logits, params, [s.generator for s in rows], history, outputs)
        ids = ids_t.tolist()
        chosen, top_ids, top_vals = [None] * len(rows), None, None
        if logprobs is not None:
            chosen = logprobs.gather(1, ids_t[:, None])[:, 0].tolist()
            kmax = max(k or 0 for k in ks)
            if kmax:
                top = logprobs.topk(kmax, dim=-1)
                top_ids, top_vals = top.indices.tolist(), top.values.tolist()
        out = []
        for row, (s, t) in enumerate(zip(rows, ids)):
            k = ks[row] or 0
            top_lp = list(zip(top_ids[row][:k], top_vals[row][:k])) if k else []
            out.append((s.request, self._append(s, t, chosen[row], top_lp)))
        self.counters.generation_tokens += len(rows)
        return out

    def _append(self, s: Sequence, token: int, logprob: float | None, top: list[tuple[int, float]]) -> TokenEvent:
        s.token_ids.append(token)
        if s.constraint is not None:
            s.constraint.accept(token)
        finished = self.engine.check_finished(s, token)
        if not finished and s.constraint is not None and s.constraint.is_finished():
            s.finish_reason, finished = "stop", True
        if finished:
            self._finish(s, s.finish_reason)
            s.request.num_finished += 1
        return TokenEvent(s.index, token, logprob, top, s.finish_reason if finished else None)
