"""LLMEngine: the public inference API (paged KV cache, prefix caching, batched decoding, sampling).

    engine = LLMEngine.load(path, device="cpu", dtype=None)   # a resolved model directory or .gguf file;
                                                              # .config .tokenizer .model
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0, max_tokens=32))  # batched
    for ev in engine.stream(ids, params): print(ev.token_id)   # ev.stats: ttft_s, decode_tok_s, prompt and
                                                               # cached prompt token counts
Lower level (what speculative decoding and chat build on):
    seq = engine.add(ids, params)       # new sequence; reuses cached prefix blocks (seq.num_cached_prompt)
    engine.step([seq, ...])             # one batched step: computes every pending token of each sequence,
                                        # samples one token each, appends it; returns the new ids
    logits = engine.extend(seq, ids)    # append tokens, compute them over the cache, return logits [n, vocab]
                                        # for every token that was pending (the last sampled one + ids)
    engine.truncate(seq, n)             # roll back to n tokens (frees blocks past it; the next step
                                        # recomputes the last token if nothing is pending)
    engine.release(seq)                 # done: blocks return to the pool, still reusable as cached prefix
    engine.forward_logits(seqs, all_positions=False)  # compute pending tokens without sampling: logits of the
                                        # last one [B, V], or with all_positions a list of [n_i, V]
    engine.set_compile("on")            # batch-1 decode steps through one compiled graph (compiled_step.py)
A sequence's last token is "pending" (its K/V not yet cached) between steps; seq.num_computed counts the
cached ones. Several engines may share one model object (each keeps its own cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmcli.config import COMPILE_MODES, ModelConfig
from llmcli.engine.block_manager import BlockManager
from llmcli.engine.compiled_step import (
    CompiledDecodeStep,
    CompileEvent,
    artifacts_path,
    cache_key,
    supported,
)
from llmcli.engine.loader import load_model
from llmcli.engine.model_runner import ModelRunner
from llmcli.engine.sampler import sample
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.scheduler import Request, Scheduler
from llmcli.engine.sequence import Sequence
from llmcli.errors import UserError
from llmcli.estimate import kv_blocks_max, kv_bytes_per_token, kv_layer_bytes
from llmcli.tokenizer import load_tokenizer

DEFAULT_CPU_KV_GIB = 1.0  # CPU: the most the KV pool takes unless --kv-cache-gib says otherwise
CUDA_KV_FRACTION = 0.85  # of the memory still free once the weights are loaded
# A sliding-window model computes a long pending run (a prompt) in chunks of at most this many tokens, so its
# windowed layer groups hold about window + PREFILL_CHUNK tokens of blocks at the peak, not the whole prompt's.
PREFILL_CHUNK = 256


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # prompt processing until the first token id is known
    decode_s: float = 0.0  # time spent producing the tokens after the first
    finish_reason: str | None = None

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            generated_tokens=self.generated_tokens,
            ttft_s=self.ttft_s,
            decode_tok_s=self.decode_tok_s,
            prefill_tok_s=self.prefill_tok_s,
            finish_reason=self.finish_reason,
        )


@dataclass
class StreamEvent:
    token_id: int
    stats: GenerationStats


def check_context(config: ModelConfig, tokens: int, what: str) -> None:
    """UserError when `what` (e.g. "--window 9,000", the flags that ask for `tokens`) is past the model's context."""
    if tokens > config.max_position_embeddings:
        raise UserError(f"{what} is past the model's context of {config.max_position_embeddings:,} tokens")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r} (use cpu or cuda)")
    return torch.device(device)


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[dtype]


class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        tokenizer=None,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gib: float | None = None,
        max_batch: int = 1,
        kv_dtype: str | None = None,
    ):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        p = model.model.norm.weight  # compute dtype even when the embedding table is quantized
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = None if kv_dtype == "auto" else kv_dtype  # None: the compute dtype
        if num_blocks is None:
            num_blocks = self._pool_blocks(block_size, kv_cache_gib, max_batch)
        self.runner = ModelRunner(model, config, num_blocks, block_size, self.kv_dtype)
        windows = self.runner.windows if self.runner.split else None
        self.block_manager = BlockManager(num_blocks, block_size, windows)
        eos = set(config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos_token_ids = frozenset(eos)
        self.source: Path | None = None  # the model file or directory (load() sets it): names compiled artifacts

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
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
        """A resolved model: a model directory or a .gguf file (the CLI resolves names and specs first).

        dequantize: expand a GGUF's Q4_0/Q4_1/Q8_0 linears to dtype instead of keeping them quantized.
        kv_dtype: the KV cache's format, a name of config.KV_DTYPE_NAMES (None or auto: the compute dtype)."""
        path = Path(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu" and dt == torch.float16:
            raise UserError("float16 is not supported on CPU; use float32 or bfloat16")
        net, config = load_model(path, dev, dt, dequantize=dequantize)
        tok = load_tokenizer(path, config.vocab_size) if tokenizer else None
        kw = dict(block_size=block_size, kv_cache_gib=kv_cache_gib, max_batch=max_batch, kv_dtype=kv_dtype)
        engine = cls(net, config, tok, **kw)
        engine.source = path
        return engine

    def set_compile(self, mode: str, on_event: Callable[[CompileEvent], None] | None = None) -> bool:
        """Batch-1 decode through the compiled step (llmcli.engine.compiled_step): mode on (the first decode step
        compiles, or loads what an earlier run of this model compiled; on_event sees its progress), off, or auto.
        Returns whether decode now runs compiled. UserError for on where the model or runner cannot (tensor
        parallel, sliding windows, ALiBi, MLA, a --kv-dtype other than auto).

        auto is eager for now: even a warm start traces the model again (8.7 s for SmolLM2 on a 2-core CPU, ~60 s
        cold) against ~7 ms saved per token, so it pays only past ~1,200 tokens; loading in a background thread
        stalled the eager decode beside it and aborted the process when it exited mid-trace (README, "CPU
        decode"). A start-up that loads without retracing (an AOTInductor package) is what would let auto turn on."""
        if mode not in COMPILE_MODES:
            raise UserError(f"unknown --compile {mode!r} (use {', '.join(COMPILE_MODES)})")
        r = self.runner
        ok = isinstance(r, ModelRunner) and supported(self.model, r.windows, r.kv_storage, self.dtype)
        if mode == "on" and not ok:
            raise UserError(
                "--compile on is not supported for this model or setting (tensor parallel, sliding "
                "windows, ALiBi, MLA or a --kv-dtype other than auto); use --compile off"
            )
        if mode != "on":
            if isinstance(r, ModelRunner):
                r.compiled_step = None
            return False
        path = artifacts_path(cache_key(self.source, self.model, r.block_size, self.dtype))
        self.model.ensure_positions(self.context_len, self.device, self.dtype)  # no table growth inside the graph
        r.compiled_step = CompiledDecodeStep(self.model, r.block_size, r.scratch_block, r.num_blocks, path, on_event)
        return True

    def _pool_blocks(
        self, block_size: int, kv_cache_gib: float | None, max_batch: int = 1, split_windows: bool = True
    ) -> int | list[int]:
        """Blocks of the KV pool. --kv-cache-gib: that many GiB. CUDA: a share of the free memory. CPU (the pool is
        host memory): what max_batch sequences of the model's whole context can use, ceil(context / block_size)
        blocks each, and no more than DEFAULT_CPU_KV_GIB (a longer-context model then gets the pool's context).
        generate() preempts when its batch outgrows the pool, so a smaller pool costs concurrency, not results.
        A model with sliding-window layers gets a pool per layer group (a list, see _group_blocks) unless
        split_windows is False (tensor parallelism's ranks share one block table)."""
        budget = self._kv_budget(kv_cache_gib)
        if split_windows and any(self.config.layer_window(i) for i in range(self.config.num_layers)):
            return self._group_blocks(block_size, budget, kv_cache_gib is None, max_batch)
        kv = getattr(self, "kv_dtype", None) or self.dtype.itemsize  # a --kv-dtype name, or the compute dtype's width
        per_block = kv_bytes_per_token(self.config, kv) * block_size
        n = int(budget // per_block)
        if kv_cache_gib is None and self.device.type == "cpu":
            n = min(n, -(-self.config.max_position_embeddings // block_size) * max(1, max_batch))
        if n < 2:
            raise UserError(f"the KV-cache budget ({budget / 2**30:.2f} GiB) is too small for this model")
        return n

    def _kv_budget(self, kv_cache_gib: float | None) -> float:
        if kv_cache_gib is not None:
            budget = kv_cache_gib * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * CUDA_KV_FRACTION
        else:
            budget = DEFAULT_CPU_KV_GIB * 2**30
        return budget

    def _group_blocks(self, block_size: int, budget: float, default: bool, max_batch: int) -> list[int]:
        """Blocks per layer group (full attention first, then each window, as ModelRunner orders them). A windowed
        group needs at most kv_blocks_max(w + PREFILL_CHUNK) blocks per sequence whatever its length (its window
        plus a prompt chunk); it gets that for every sequence the pool is sized for, and the full-attention
        group the rest of the budget, so a windowed model's context under a fixed budget grows by what its windowed
        layers no longer keep. Without a full group the windowed groups share the budget in those proportions."""
        cfg, bs = self.config, block_size
        kv = getattr(self, "kv_dtype", None) or self.dtype.itemsize
        windows = sorted({cfg.layer_window(i) for i in range(cfg.num_layers)}, key=lambda w: w or 0)
        per_block = [0] * len(windows)  # bytes of one block in each group's layers
        for i in range(cfg.num_layers):
            per_block[windows.index(cfg.layer_window(i))] += kv_layer_bytes(cfg, i, kv) * bs
        ctx_blocks = -(-cfg.max_position_embeddings // bs)
        need = [ctx_blocks if w is None else min(ctx_blocks, kv_blocks_max(w + PREFILL_CHUNK, bs)) for w in windows]
        per_seq = sum(n * b for n, b in zip(need, per_block))
        seqs = max(1, max_batch)
        if not default or self.device.type != "cpu":  # a fixed budget: as many whole-context sequences as it holds
            seqs = max(seqs, int(budget // per_seq))
        counts = [n * seqs for n in need]
        if windows[0] is None:
            rest = budget - sum(c * b for c, b in zip(counts[1:], per_block[1:]))
            counts[0] = int(rest // per_block[0]) if rest > 0 else 0
            if default and self.device.type == "cpu":
                counts[0] = min(counts[0], ctx_blocks * seqs)
        elif per_seq * seqs > budget:  # windowed groups only, and less than one sequence's need: shrink them alike
            counts = [int(n * budget // per_seq) for n in need]
        if min(counts) < 2:
            raise UserError(f"the KV-cache budget ({budget / 2**30:.2f} GiB) is too small for this model")
        return counts

    # ---- the context ---------------------------------------------------------------------------
    @property
    def pool_tokens(self) -> int:
        """Tokens the KV pool holds for one sequence: the full-attention layers' pool (a sliding-window group holds
        its window whatever the length, unless its pool is smaller than that; then that pool)."""
        unbounded = 1 << 40  # past every window: only full-attention pools (or too small windowed ones) bound it
        most = self.block_manager.max_tokens(unbounded)
        return self.config.max_position_embeddings if most == unbounded else most

    @property
    def context_len(self) -> int:
        """The most tokens one sequence holds, prompt and generated together: the model's max_position_embeddings,
        or the KV pool's capacity where that is smaller. add/generate refuse a prompt that leaves no room, and
        generation stops at it (finish_reason "length"), so nothing runs past the positions the model knows."""
        return min(self.config.max_position_embeddings, self.pool_tokens)

    def _context_words(self) -> str:
        n = self.context_len
        if n < self.config.max_position_embeddings:
            return f"{n:,} tokens (the KV cache's size; the model's context is {self.config.max_position_embeddings:,})"
        return f"{n:,} tokens"

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """UserError, with the numbers, when the prompt is empty or leaves no room in the context for one token
        (a prompt alone, max_tokens 0, may fill it)."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        self.check_ids(prompt_ids)
        most = self.context_len - (1 if params.max_tokens > 0 else 0)
        if len(prompt_ids) > most:
            raise UserError(
                f"the prompt is {len(prompt_ids):,} tokens but the context holds {self._context_words()}, "
                f"prompt and reply together: shorten the prompt to at most {most:,} tokens"
            )

    def check_ids(self, token_ids: list[int]) -> None:
        """UserError for a token id the embedding has no row for (a tokenizer of another model, a hand-made id
        list), instead of the IndexError deep inside the embedding lookup. Checked where ids enter (prompts,
        extend), not per decode step: sampled ids come from this model's own logits."""
        vocab = self.config.vocab_size
        top, low = max(token_ids, default=0), min(token_ids, default=0)
        if top >= vocab or low < 0:
            bad = top if top >= vocab else low
            raise UserError(
                f"token id {bad:,} is outside the model's vocabulary of {vocab:,} ids "
                "(a tokenizer that does not belong to these weights?)"
            )

    # ---- low-level API -----------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Sequence:
        """A new sequence for the prompt (refused when it does not fit the context, check_prompt)."""
        params = params or SamplingParams()
        self.check_prompt(prompt_ids, params)
        seq = Sequence(list(prompt_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.block_manager.match_prefix(seq)
        return seq

    @torch.inference_mode()
    def forward_logits(self, seqs: list[Sequence], all_positions: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Compute every pending token of each sequence; logits of the last one [B, V] (or all of them, listed)."""
        for seq in seqs:
            if len(seq) > self.context_len:  # extend() past the context (speculation caps its drafts before this)
                raise UserError(f"a sequence of {len(seq):,} tokens is past the context of {self._context_words()}")
            if seq.num_computed >= len(seq):  # e.g. after a rollback: recompute the last token for its logits
                self.runner.copy_blocks(self.block_manager.uncompute_last(seq))
        early = [self._prefill_chunks(seq, all_positions) for seq in seqs] if self.block_manager.windowed else None
        for seq in seqs:
            self.block_manager.ensure_capacity(seq, len(seq))
        batch = [(seq, seq.num_computed, len(seq)) for seq in seqs]
        hidden = self.runner.forward(batch)
        for seq in seqs:
            self.block_manager.commit(seq, len(seq))
        if all_positions:
            out = [self.model.compute_logits(hidden[i, : e - s]) for i, (_, s, e) in enumerate(batch)]
            return [torch.cat([*parts, o]) for parts, o in zip(early, out)] if early else out
        if len(seqs) == 1:
            return self.model.compute_logits(hidden[:, -1])
        last = torch.tensor([e - s - 1 for _, s, e in batch], device=self.device)
        return self.model.compute_logits(hidden[torch.arange(len(seqs), device=self.device), last])

    def _prefill_chunks(self, seq: Sequence, keep_logits: bool) -> list[torch.Tensor]:
        """Sliding-window models: compute seq's pending tokens but the last PREFILL_CHUNK in chunks of that size,
        each committed (its windowed groups releasing the blocks that left the window) before the next. Returns
        their logits when asked for."""
        if len(seq) - seq.num_computed <= PREFILL_CHUNK:
            return []
        return self._compute_until(seq, len(seq) - PREFILL_CHUNK, keep_logits)

    def _compute_until(self, seq: Sequence, end: int, keep_logits: bool = False) -> list[torch.Tensor]:
        """Compute tokens [num_computed, end) of seq in chunks of at most PREFILL_CHUNK (logits when asked for)."""
        parts = []
        while seq.num_computed < end:
            s = seq.num_computed
            e = min(end, s + PREFILL_CHUNK)
            self.block_manager.ensure_capacity(seq, e)
            hidden = self.runner.forward([(seq, s, e)])
            self.block_manager.commit(seq, e)
            if keep_logits:
                parts.append(self.model.compute_logits(hidden[0]))
        return parts

    @torch.inference_mode()
    def forward_window(self, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        """Run token_ids through the model as a fresh sequence, every position computed even where a cached
        prefix matched (a measurement sees each token's own forward: perplexity, calibration hooks), then
        release it. Logits of the last token [V], or with all_positions of every token [n, V]."""
        seq = self.add(token_ids, SamplingParams(max_tokens=0))  # the whole context is there to be scored
        try:
            if self.block_manager.windowed:  # a windowed group's matched prefix lacks the blocks before its window
                self.block_manager.free_sequence(seq)
            seq.num_computed = 0
            return self.forward_logits([seq], all_positions=all_positions)[0]
        finally:
            self.release(seq)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[int]:
        """One batched step: compute pending tokens, sample one token per sequence, append it."""
        logits = self.forward_logits(seqs)
        history = [s.token_ids for s in seqs] if any(s.params.repetition_penalty != 1 for s in seqs) else None
        ids = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], history).tolist()
        for seq, t in zip(seqs, ids):
            seq.token_ids.append(t)
            self.check_finished(seq, t)
        return ids

    def extend(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor:
        """Append token_ids and compute them over the cache: logits [n, V] for all n pending tokens."""
        self.check_ids(token_ids)
        seq.token_ids.extend(token_ids)
        return self.forward_logits([seq], all_positions=True)[0]

    def truncate(self, seq: Sequence, length: int) -> None:
        """Roll seq back to its first `length` tokens (its cache too). The next step recomputes the last one
        if its logits are needed (nothing is pending)."""
        if not 0 < length <= len(seq):
            raise ValueError(f"cannot truncate a {len(seq)}-token sequence to {length}")
        cached = min(seq.num_computed, length)
        self.runner.copy_blocks(self.block_manager.truncate(seq, length))
        with torch.inference_mode():  # a window's block was gone: recompute what the rollback keeps cached, so the
            self._compute_until(seq, cached)  # caller sees the pending tokens it expects (speculation: one)
        seq.finished, seq.finish_reason = False, None

    def release(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)

    def check_finished(self, seq: Sequence, token: int, num_generated: int | None = None) -> bool:
        """Whether `token`, the sequence's num_generated-th generated token (default: its last one), ends it: an
        end-of-sequence or stop token ("stop"), or the max_tokens budget or the context's end ("length"). Marks
        seq finished if so.

        At the context's end generation stops as llama.cpp's server and vLLM do (finish_reason "length") rather
        than refusing a max_tokens that reaches past it: --max-tokens is an upper bound that a default value must
        not turn into an error for a long prompt, and the caller sees why the reply ended."""
        p = seq.params
        n = seq.num_generated if num_generated is None else num_generated
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            seq.finished, seq.finish_reason = True, "stop"
        elif n >= p.max_tokens or seq.num_prompt_tokens + n >= self.context_len:
            seq.finished, seq.finish_reason = True, "length"
        return seq.finished

    # ---- high-level API ---------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[list[int]]:
        """Generate for several prompts at once (batched decode); returns the new token ids of each.

        The serving scheduler's batching (llm serve's): every prompt prefilled in the first step, one decode row
        per sequence after that, preemption by recompute when the batch outgrows the KV pool."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        for p, sp in zip(prompts, plist):
            self.check_prompt(p, sp)  # every prompt, before any of them runs
        budget = sum(len(p) for p in prompts) + len(prompts)
        sched = Scheduler(self, max_num_seqs=max(1, len(prompts)), max_num_batched_tokens=max(1, budget))
        reqs = [Request(list(p), sp) for p, sp in zip(prompts, plist)]
        for r in reqs:
            sched.add(r)
        while sched.has_work():
            sched.step()
        return [r.samples[0].output_ids if r.samples else [] for r in reqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Generate for one prompt, yielding each token as soon as it is known (with live stats)."""
        params = params or SamplingParams()
        t0 = time.perf_counter()
        seq = self.add(prompt_ids, params)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), cached_prompt_tokens=seq.num_cached_prompt)
        try:
            if params.max_tokens <= 0:
                return
            t_first = None
            while True:
                (tok,) = self.step([seq])
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.ttft_s = now - t0
                else:
                    stats.decode_s = now - t_first
                stats.generated_tokens += 1
                if seq.finished:
                    stats.finish_reason = seq.finish_reason
                yield StreamEvent(tok, stats)
                if seq.finished:
                    return
        finally:
            self.release(seq)
