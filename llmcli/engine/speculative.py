"""Speculative decoding: cheap drafts, one target forward to verify them, and an output distribution that is
exactly the target's.

A drafter proposes K tokens (a small draft model sampling autoregressively, or n-gram "prompt lookup" that copies
what followed the last few tokens earlier in the context). The target scores all K (plus one) positions in a single
forward over its KV cache; `rejection_sample` then keeps a prefix of the drafts with the modified rejection sampling
of Leviathan et al. / Chen et al. (2023): draft token x is accepted with probability min(1, p(x) / q(x)); at the
first rejection a replacement is drawn from normalize(max(0, p - q)); if all K survive, a bonus token is drawn from
the target's next distribution. Each step therefore emits between 1 and K + 1 tokens, distributed exactly as if the
target had sampled them one by one. Greedy decoding is the special case p, q one-hot: accept while draft == argmax.

The functions here are pure (tensors in, tensors out, batched over rows); then comes the decoder that drives
engines, and last the plain-decoding speed `llm run` and `llm chat` compare it against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmcli.engine.llm_engine import GenerationStats, LLMEngine, StreamEvent
from llmcli.engine.sampler import penalized, sampling_probs
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.sequence import Sequence
from llmcli.errors import UserError

# ---- drafting -------------------------------------------------------------------------------------------------


def ngram_propose(context: torch.Tensor, k: int, max_ngram: int = 4, min_ngram: int = 1) -> torch.Tensor:
    """Prompt-lookup drafting: up to k tokens that followed the most recent earlier occurrence of the context's suffix.

    Tries the last n tokens for n = max_ngram down to min_ngram (longer matches predict better) and returns the
    tokens that followed the latest earlier match; an empty tensor when nothing matches. context: 1-D token ids.
    """
    context = context.reshape(-1)
    length = context.numel()
    if k <= 0 or length < 2:
        return context[:0]
    # windows over context[:-1] so every match is followed by at least one token, and the suffix never matches itself
    head = context[:-1]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        hits = (head.unfold(0, n, 1) == context[length - n :]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start : start + k]
    return context[:0]


# ---- verification -----------------------------------------------------------------------------------------------


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] (rows need not be normalized) -> [...].

    argmax(p / E) with E ~ Exponential(1) picks index i with probability p_i / sum(p) (the exponential race); unlike
    torch.multinomial it is one batched elementwise op with no host sync, on any device.
    """
    e = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / e).argmax(dim=-1)


def rejection_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify K drafted tokens per row so the emitted tokens are distributed exactly as the target's.

    draft_tokens [B, K]; draft_probs [B, K, V] the distributions the drafts were sampled from, or None for
    deterministic drafts (n-gram: a one-hot q, so acceptance is simply p(x)); target_probs [B, K + 1, V] the target's
    sampling distributions at each draft position plus the one after the last draft.
    Returns (tokens [B, K + 1] — accepted drafts, then the corrected/bonus token, then -1 padding — and
    num_accepted [B]); each row emits num_accepted + 1 tokens.
    """
    b, k = draft_tokens.shape
    idx = draft_tokens.unsqueeze(-1)
    p = target_probs[:, :k].gather(-1, idx).squeeze(-1)  # [B, K] target prob of each draft
    q = draft_probs.gather(-1, idx).squeeze(-1) if draft_probs is not None else torch.ones_like(p)
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    accept = u * q < p  # u < p / q without dividing by a possibly tiny q
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # length of the accepted prefix

    # the distribution of the token emitted after the accepted prefix: residual at the first rejection, else bonus
    rows = torch.arange(b, device=p.device)
    first_reject = num_accepted.clamp(max=k - 1) if k else num_accepted
    if k:
        p_rej = target_probs[rows, first_reject]
        if draft_probs is not None:
            residual = (p_rej - draft_probs[rows, first_reject]).clamp_(min=0)
        else:
            residual = p_rej.scatter(-1, draft_tokens[rows, first_reject].unsqueeze(-1), 0.0)
        # p == q on the support leaves no mass: rejection then had probability 0, any distribution is correct
        empty = residual.sum(-1, keepdim=True) <= 0
        residual = torch.where(empty, p_rej, residual)
        final = torch.where((num_accepted < k).unsqueeze(-1), residual, target_probs[:, k])
    else:
        final = target_probs[:, 0]
    extra = sample(final, generator)
    return _assemble(draft_tokens, num_accepted, extra), num_accepted


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: accept drafts while they equal the target's argmax; then emit the target's argmax.

    draft_tokens [B, K], target_logits [B, K + 1, V] -> (tokens [B, K + 1] padded with -1, num_accepted [B]).
    """
    k = draft_tokens.shape[1]
    best = target_logits.argmax(dim=-1)  # [B, K + 1]
    num_accepted = (draft_tokens == best[:, :k]).long().cumprod(dim=1).sum(dim=1)
    extra = best.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return _assemble(draft_tokens, num_accepted, extra), num_accepted


def _assemble(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    b, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device).expand(b, k + 1)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((b, 1), -1)], dim=1)
    n = num_accepted.unsqueeze(1)
    out = torch.where(pos < n, padded, torch.full_like(padded, -1))
    return torch.where(pos == n, extra.unsqueeze(1).to(out.dtype), out)


# ---- bookkeeping --------------------------------------------------------------------------------------------------


@dataclass
class SpecStats:
    """Counters for one generation; `steps` counts target verification forwards."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    def update(self, drafted: int, accepted: int, emitted: int | None = None) -> None:
        """emitted: tokens actually kept (fewer than accepted + 1 when an EOS cut the step short)."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += accepted + 1 if emitted is None else emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per verification step (tokens emitted per step is this + 1)."""
        return self.accepted / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted": round(self.mean_accepted, 3),
        }


@dataclass
class SpecGenerationStats(GenerationStats):
    """The engine's generation stats plus the speculation counters (in to_dict under "speculative")."""

    speculative: SpecStats = field(default_factory=SpecStats)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "speculative": self.speculative.to_dict()}


@dataclass
class AdaptiveK:
    """Draft length that grows by 2 after a fully accepted step and shrinks by 1 after a rejection, in [lo, hi].

    Drafting past the first rejection is wasted work (draft forwards, wider target forward), so K follows how far
    the drafts have recently been right; asymmetric steps because a long accepted run tends to continue.
    """

    k: int
    lo: int = 1
    hi: int = 10

    def update(self, drafted: int, accepted: int) -> None:
        if drafted and accepted == drafted:
            self.k = min(self.hi, self.k + 2)
        elif accepted < drafted:
            self.k = max(self.lo, self.k - 1)


# ---- the decoder ---------------------------------------------------------------------------------------------------

DEFAULT_NUM_DRAFT = {"draft": 4, "ngram": 8}
MAX_NUM_DRAFT = 16


def check_compatible(target: LLMEngine, draft: LLMEngine) -> None:
    """A draft must speak the target's token ids: same vocabulary size and, when both are known, the same vocab."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise UserError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv} tokens); "
            "a draft must use the same tokenizer"
        )
    ta, da = _vocab(target.tokenizer), _vocab(draft.tokenizer)
    if ta is not None and da is not None and ta != da:
        diff = sum(1 for k, v in ta.items() if da.get(k) != v)
        raise UserError(
            f"the draft model's tokenizer differs from the target's ({diff} of {len(ta)} tokens map to "
            "other ids); a draft must use the same tokenizer"
        )


def _vocab(tokenizer) -> dict | None:
    if tokenizer is None:
        return None
    for name in ("get_vocab", "vocab"):
        v = getattr(tokenizer, name, None)
        v = v() if callable(v) else v
        if isinstance(v, dict):
            return v
    inner = next((getattr(tokenizer, a) for a in ("backend", "tokenizer", "_tokenizer") if hasattr(tokenizer, a)), None)
    if inner is not None and inner is not tokenizer and hasattr(inner, "get_vocab"):
        return inner.get_vocab()
    return None


class SpeculativeDecoder:
    """Generate with a target LLMEngine, drafting with a draft LLMEngine or n-gram lookup; same output distribution.

    Both engines keep their own paged cache for their own copy of the sequence. Each step: draft K tokens, append
    them to the target sequence and compute them in one forward over its cache (the engine's bottom-right causal
    multi-token forward), verify, then truncate both sequences back to the accepted length and append the corrected /
    bonus token (still pending: it is computed as the first query of the next step's forward).
    """

    def __init__(
        self,
        target: LLMEngine,
        draft: LLMEngine | None = None,
        *,
        method: str | None = None,
        num_draft: int | None = None,
        adaptive: bool = True,
        max_ngram: int = 4,
        min_ngram: int = 1,
    ):
        method = method or ("draft" if draft is not None else "ngram")
        if method not in DEFAULT_NUM_DRAFT:
            raise UserError(f"unknown speculation method {method!r} (use a draft model or 'ngram')")
        if method == "draft" and draft is None:
            raise UserError("speculation with a draft model needs --draft MODEL")
        if draft is not None:
            check_compatible(target, draft)
        num_draft = DEFAULT_NUM_DRAFT[method] if num_draft is None else num_draft
        if not 1 <= num_draft <= MAX_NUM_DRAFT:
            raise UserError(f"--num-draft must be between 1 and {MAX_NUM_DRAFT} (got {num_draft})")
        self.target, self.draft, self.method = target, draft if method == "draft" else None, method
        # A rejected draft rolls back at most num_draft tokens, and a rollback that leaves nothing pending counts the
        # last token's query too: sliding-window groups keep that many more, so it never reaches a released block.
        for e in (target, self.draft):
            if e is not None:
                e.block_manager.rollback_slack = max(e.block_manager.rollback_slack, num_draft + 1)
        self.num_draft, self.adaptive = num_draft, adaptive
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.stats = SpecStats()

    # ---- public API ---------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> list[int]:
        return [ev.token_id for ev in self.stream(prompt_ids, params)]

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Like LLMEngine.stream: yields StreamEvent(token_id, stats) per token; stats.speculative holds SpecStats."""
        params = params or SamplingParams()
        t0 = time.perf_counter()
        target = self.target
        ts = target.add(prompt_ids, params)
        ds = self.draft.add(prompt_ids, params) if self.draft is not None else None
        stats = SpecGenerationStats(prompt_tokens=len(prompt_ids), cached_prompt_tokens=ts.num_cached_prompt)
        self.stats = stats.speculative
        draft_gen = None
        if ds is not None and params.seed is not None:  # drafts get their own stream so seeded runs reproduce
            draft_gen = torch.Generator(self.draft.device).manual_seed((params.seed + 1) % 2**64)
        k_ctl = AdaptiveK(self.num_draft, 1, self.num_draft) if self.adaptive else None
        try:
            if params.max_tokens <= 0:
                return
            (first,) = target.step([ts])  # prompt prefill + first token, exactly as plain decoding
            if ds is not None:
                self.draft.forward_logits([ds])  # draft prefill, counted in time-to-first-token like the target's
                ds.token_ids.append(first)
            stats.ttft_s = time.perf_counter() - t0
            t_first = time.perf_counter()
            stats.generated_tokens = 1
            stats.finish_reason = ts.finish_reason if ts.finished else None
            yield StreamEvent(first, stats)
            while not ts.finished:
                k = k_ctl.k if k_ctl else self.num_draft
                k = min(k, params.max_tokens - ts.num_generated - 1)  # never draft past the token budget
                k = min(k, *(e.context_len - len(q) - 1 for e, q in ((target, ts), (self.draft, ds)) if q is not None))
                emitted, drafted, n_acc = self._step(ts, ds, max(k, 0), draft_gen)
                self.stats.update(drafted, n_acc, len(emitted))
                if k_ctl and drafted:
                    k_ctl.update(drafted, n_acc)
                for tok in emitted:
                    stats.generated_tokens += 1
                    stats.decode_s = time.perf_counter() - t_first
                    if ts.finished:
                        stats.finish_reason = ts.finish_reason
                    yield StreamEvent(tok, stats)
        finally:
            target.release(ts)
            if ds is not None:
                self.draft.release(ds)

    # ---- one draft-verify step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(
        self, ts: Sequence, ds: Sequence | None, k: int, draft_gen: torch.Generator | None
    ) -> tuple[list[int], int, int]:
        """Draft up to k tokens, verify them; returns (emitted tokens, drafted count, accepted count)."""
        target, params = self.target, ts.params
        length = len(ts)  # the last token is pending (sampled, not yet in the cache)
        drafts, q = self._propose(ts, ds, k, draft_gen)
        kd = len(drafts)
        logits = target.extend(ts, drafts)  # [kd + 1, V]: next-token logits after the last token and each draft
        histories = [ts.token_ids[: length + i] for i in range(kd + 1)] if params.repetition_penalty != 1 else None
        rows = [params] * (kd + 1)
        logits = penalized(logits, rows, histories)
        d = torch.tensor([drafts], dtype=torch.long, device=logits.device)
        if params.greedy:
            tokens, n = greedy_verify(d, logits.unsqueeze(0))
        else:
            tokens, n = rejection_sample(d, q, sampling_probs(logits, rows).unsqueeze(0), ts.generator)
        n = int(n)
        emitted = tokens[0, : n + 1].tolist()  # the one host sync of the step
        # roll back to the accepted prefix and append the corrected/bonus token (pending, like after engine.step)
        if n < kd:
            target.truncate(ts, length + n)
        ts.token_ids.append(emitted[-1])
        # stop at the first token that ends the sequence; any accepted tokens after it are never shown
        for i, tok in enumerate(emitted):
            if target.check_finished(ts, tok, length + i + 1 - ts.num_prompt_tokens):
                emitted = emitted[: i + 1]
                break
        if ds is not None and not ts.finished:
            if n < kd:
                self.draft.truncate(ds, length + n)
            ds.token_ids.append(emitted[-1])
        return emitted, kd, n

    def _propose(
        self, ts: Sequence, ds: Sequence | None, k: int, draft_gen: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens (maybe fewer for n-gram) and their draft distributions [1, k, V] (None: deterministic)."""
        if k <= 0:
            return [], None
        if ds is None:
            ctx = torch.tensor(ts.token_ids, dtype=torch.long)
            return ngram_propose(ctx, k, self.max_ngram, self.min_ngram).tolist(), None
        draft, params = self.draft, ts.params
        toks, qs = [], []
        for _ in range(k):  # autoregressive by nature: each draft token conditions on the previous one
            logits = draft.forward_logits([ds])  # [1, V]; computes every pending token (1, or 2 after a full accept)
            logits = penalized(logits, [params], [ds.token_ids])
            if params.greedy:
                tok = int(logits.argmax(-1))
            else:
                q = sampling_probs(logits, [params])
                qs.append(q)
                tok = int(sample(q, draft_gen))
            ds.token_ids.append(tok)
            toks.append(tok)
        q = torch.stack(qs, dim=1).to(self.target.device) if qs else None
        return toks, q


# ---- measuring ----------------------------------------------------------------------------------------------------


def plain_decode_tok_s(engine: LLMEngine, prompt_ids: list[int], steps: int = 6) -> float:
    """Plain one-token-per-forward decode speed of engine after this prompt (the prompt prefix is usually cached).

    `llm run` uses it to turn speculative tok/s into a speed-up without generating the whole reply twice.
    """
    seq = engine.add(prompt_ids, SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True))
    try:
        engine.step([seq])  # the uncached prompt tail
        engine.step([seq])  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            engine.step([seq])
        return steps / (time.perf_counter() - t)
    finally:
        engine.release(seq)


def run_summary(decoder: SpeculativeDecoder, prompt_ids: list[int], decode_tok_s: float) -> dict:
    """Stats for `llm run`: the counters plus a speed-up against a short plain decode of the same prompt."""
    plain = plain_decode_tok_s(decoder.target, prompt_ids)
    return {
        **decoder.stats.to_dict(),
        "plain_decode_tok_s_est": round(plain, 2),
        "speedup_est": round(decode_tok_s / plain, 3) if plain and decode_tok_s else None,
    }
