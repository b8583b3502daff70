"""Batched sampling on device: repetition / frequency / presence penalties, temperature, top-k, top-p, min-p,
per-sequence seeds.

The chosen ids stay on device; the caller reads them once per step. Rows with temperature 0 take the argmax.
Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws from p exactly and lets every
sequence use its own torch.Generator for reproducible seeds.
"""

from __future__ import annotations

import torch

from llmcli.engine.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """CTRL-style penalty on every token seen so far: divide positive logits, multiply negative ones."""
    for row, (ids, p) in enumerate(zip(history, penalties)):
        if p == 1.0 or not ids:
            continue
        idx = torch.tensor(ids, device=logits.device)
        seen = logits[row].gather(0, idx)
        logits[row].scatter_(0, idx, torch.where(seen > 0, seen / p, seen * p))
    big = torch.finfo(logits.dtype).max  # a penalty near 0 (or huge) stays finite: ties, never inf - inf = nan
    return logits.clamp_(-big, big)


def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    any_k: bool,
    any_p: bool,
    any_min_p: bool,
) -> torch.Tensor:
    """Mask filtered-out tokens with -inf (logits already divided by temperature)."""
    if any_k:
        vocab = logits.shape[-1]
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (always keeps the first)
        drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
        drop[:, 0] = False  # even a top_p that rounds to 0 in float32 (5e-324) keeps the likeliest token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any_min_p:
        probs = logits.softmax(-1)
        thresh = probs.max(-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def apply_additive_penalties(
    logits: torch.Tensor, outputs: list[list[int]], frequency: list[float], presence: list[float]
) -> torch.Tensor:
    """OpenAI's frequency / presence penalties, in place: counts of each row's generated tokens [B, V] come from one
    scatter_add over the rows padded to the longest (padding adds 0), then one fused subtract."""
    dev, b = logits.device, logits.shape[0]
    width = max((len(o) for o in outputs), default=0)
    if width == 0:
        return logits
    ids = torch.zeros(b, width, dtype=torch.long, device=dev)
    ones = torch.zeros(b, width, dtype=logits.dtype, device=dev)
    for row, out in enumerate(outputs):  # one list copy per row, not per token
        if out:
            ids[row, : len(out)] = torch.tensor(out, device=dev)
            ones[row, : len(out)] = 1
    counts = torch.zeros_like(logits).scatter_add_(1, ids, ones)
    freq = torch.tensor(frequency, dtype=logits.dtype, device=dev)[:, None]
    pres = torch.tensor(presence, dtype=logits.dtype, device=dev)[:, None]
    return logits.sub_(counts * freq + (counts > 0).to(logits.dtype) * pres)


def penalized(
    logits: torch.Tensor,
    params: list[SamplingParams],
    history: list[list[int]] | None,
    outputs: list[list[int]] | None = None,
) -> torch.Tensor:
    """The logits with each row's repetition penalty applied to its history and its frequency / presence penalties
    to its generated tokens `outputs` (a copy), or as they are when no row has a penalty to apply."""
    rep = history is not None and any(p.repetition_penalty != 1.0 for p in params)
    add = outputs is not None and any(p.frequency_penalty or p.presence_penalty for p in params)
    if not (rep or add):
        return logits
    logits = logits.clone()
    if rep:
        logits = apply_repetition_penalty(logits, history, [p.repetition_penalty for p in params])
    if add:
        fp, pp = [p.frequency_penalty for p in params], [p.presence_penalty for p in params]
        logits = apply_additive_penalties(logits, outputs, fp, pp)
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row is sampled from [B, V]: logits over temperature (1 for greedy rows), then the
    top-k / top-p / min-p filters, softmaxed. Speculative decoding verifies drafts against exactly this."""
    dev, vocab = logits.device, logits.shape[-1]
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    # Shifted so the top logit is 0 (softmax and every filter are shift-invariant): a temperature so small that
    # logits / t overflows still gives the top token probability 1, never inf / inf; below the smallest normal
    # float the temperature is that float (the same greedy limit).
    temp = temp.clamp(min=torch.finfo(logits.dtype).tiny)
    scaled = (logits - logits.max(-1, keepdim=True).values) / temp.unsqueeze(1)
    scaled = filter_logits(
        scaled,
        torch.tensor([min(p.top_k, vocab) for p in params], device=dev),  # any k > vocab keeps every token
        torch.tensor([p.top_p for p in params], device=dev),
        torch.tensor([p.min_p for p in params], device=dev),
        any(p.top_k > 0 for p in params),
        any(p.top_p < 1.0 for p in params),
        any(p.min_p > 0 for p in params),
    )
    return scaled.softmax(-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B] on device. history: every token of each row (repetition penalty);
    outputs: its generated tokens (frequency / presence penalties)."""
    logits = penalized(logits, params, history, outputs)
    greedy = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy
    probs = sampling_probs(logits, params)
    noise = torch.empty_like(probs)
    for row, g in enumerate(generators):  # one draw per sequence so a seeded sequence is reproducible
        noise[row].exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    return torch.where(is_greedy, greedy, sampled)
