"""Speculative decoding: cheap drafts, one target forward to verify them, and an output distribution that is
exactly the target's.

A drafter proposes K tokens (a small draft model sampling autoregressively, or n-gram "prompt lookup" that copies
what followed the last few tokens earlier in the context). The target scores all K (plus one) positions in a single
forward over its KV cache; `rejection_sample` then keeps a prefix of the drafts with the modified rejection sampling
of Leviathan et al. / Chen et al. (2023): draft token x is accepted with probability min(1, p(x) / q(x)); at the
first rejection a replacement is drawn from normalize(max(0, p - q)); if all K survive, a bonus token is drawn from
the target's next distribution. Each step therefore emits between 1 and K + 1 tokens, distributed exactly as if the
target had sampled them one by one. Greedy decoding is the special case p, q one-hot: accept while draft == argmax.

The functions here are pure (tensors in, tensors out, batched over rows); the decoder that drives engines comes last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        hits = (head.unfold(0, n, 1) == context[length - n:]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start:start + k]
    return context[:0]


# ---- verification -----------------------------------------------------------------------------------------------


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] (rows need not be normalized) -> [...].

    argmax(p / E) with E ~ Exponential(1) picks index i with probability p_i / sum(p) (the exponential race); unlike
    torch.multinomial it is one batched elementwise op with no host sync, on any device.
    """
    e = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / e).argmax(dim=-1)


def rejection_sample(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

    def update(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += accepted + 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per verification step (tokens emitted per step is this + 1)."""
        return self.accepted / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted": round(self.mean_accepted, 3)}


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
