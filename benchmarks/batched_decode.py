"""Decode step time and aggregate tok/s of the serving scheduler at 1, 4, 16 and 64 streams (CPU by default).

usage: python benchmarks/batched_decode.py [MODEL] [--streams 1,4,16,64] [--contexts 128,1000] [--steps 8]
                                           [--profile 16,64] [--dtype float32] [--threads N] [--fresh-gather]
                                           [--mixed STREAMS,CHUNK] [--long-short N,SHORT,LONG]
MODEL is anything `llm` resolves (default: the built-in SmolLM2 GGUF, kept quantized). Each stream starts with
`context` tokens in the KV cache (random K/V, see _scheduler); --steps scheduler steps (one decode token per
stream, sampling included) are timed and the median is reported. --profile lists where a step's time goes
(torch.profiler, self CPU time by op) at those stream counts, for the largest context.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _scheduler(engine, streams: int, context: int, steps: int):
    """A scheduler with `streams` sequences already past a `context`-token prompt, each about to decode. Their
    cached K/V are random values written straight into the pool (what a decode step reads does not depend on them,
    and 64 real 1000-token prefills would take minutes on a laptop CPU); every stream has blocks of its own."""
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.scheduler import Request, Scheduler

    sched = Scheduler(engine, max_num_seqs=streams, max_num_batched_tokens=max(streams, 512))
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    gen = torch.Generator().manual_seed(streams * 7919 + context)
    bm = engine.block_manager
    for _ in range(streams):
        ids = torch.randint(3, engine.config.vocab_size, (context + 1,), generator=gen).tolist()
        req = Request(ids, params, admitted=True)
        seq = sched._new_sample(req, 0, ids)
        bm.ensure_capacity(seq, context + 1)
        bm.commit(seq, context)  # the prompt's K/V are "in the cache"; its last token is pending
        sched.running.append(seq)
    used = sorted({b for s in sched.running for b in s.block_table})
    idx = torch.tensor(used)
    for cache in engine.runner.caches:
        cache[:, idx] = torch.randn(cache[:, idx].shape, generator=gen, dtype=cache.dtype) * 0.5
    sched.step()  # one warm-up decode step at this batch size
    return sched


def measure(engine, streams: int, context: int, steps: int) -> float:
    """Median seconds of one decode step with `streams` sequences of about `context` tokens."""
    sched = _scheduler(engine, streams, context, steps)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sched.step()
        times.append(time.perf_counter() - t0)
    sched.abort_all()
    return statistics.median(times)


def mixed(engine, streams: int, context: int, chunk: int, rounds: int = 3) -> tuple[float, float]:
    """Seconds of a step with `streams` decode rows and one `chunk`-token prompt chunk: (decode rows as one [B, 1]
    forward + the chunk as its own, what the scheduler does; everything as one batch padded to the chunk)."""
    from llmcli.engine.sequence import Sequence

    sched = _scheduler(engine, streams, context, 4)
    rows = [(s, len(s) - 1, len(s)) for s in sched.running]
    prompt = Sequence(torch.randint(3, engine.config.vocab_size, (chunk,)).tolist())
    engine.block_manager.ensure_capacity(prompt, chunk)
    split, padded = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            t0 = time.perf_counter()
            engine.runner.forward(rows)
            engine.runner.forward([(prompt, 0, chunk)])
            t1 = time.perf_counter()
            engine.runner.forward([*rows, (prompt, 0, chunk)])
            t2 = time.perf_counter()
            split, padded = min(split, t1 - t0), min(padded, t2 - t1)
    engine.block_manager.free_sequence(prompt)
    sched.abort_all()
    return split, padded


def long_short(engine, short: int, short_len: int, long_len: int) -> dict[str, float]:
    """Step seconds with `short` streams of short_len tokens and one of long_len: rows padded to the longest in one
    forward vs split by length (the scheduler's pad_split_tokens)."""
    from llmcli.engine.scheduler import PAD_SPLIT_TOKENS

    sched = _scheduler(engine, short, short_len, 12)
    sched.running += _scheduler(engine, 1, long_len, 12).running
    out = {}
    for name, split in (("one padded forward", 10**12), ("split by length", PAD_SPLIT_TOKENS)):
        sched.pad_split_tokens = split
        sched.step()
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            sched.step()
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    sched.abort_all()
    return out


def profile(engine, streams: int, context: int) -> None:
    sched = _scheduler(engine, streams, context, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            sched.step()
    sched.abort_all()
    print(f"\nprofile: {streams} streams, context {context}, 3 steps (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    from llmcli.engine.llm_engine import LLMEngine, resolve_dtype
    from llmcli.estimate import kv_bytes_per_token
    from llmcli.hub.default_model import default_model_path
    from llmcli.hub.inspect import model_config
    from llmcli.hub.resolve import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--contexts", default="128,1000")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", default="", help="stream counts to profile at the largest context, e.g. 16,64")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mixed", default="", help="STREAMS,CHUNK: time decodes + a prompt chunk, split vs padded")
    ap.add_argument("--long-short", default="", help="N,SHORT,LONG: N short streams and one long, padded vs split")
    ap.add_argument("--fresh-gather", action="store_true", help="the old path: a new gather tensor every layer")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    streams = [int(s) for s in a.streams.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]
    path = resolve_model(a.model) if a.model else default_model_path(fetch=True)
    itemsize = resolve_dtype(a.dtype, torch.device(a.device)).itemsize
    per_token = kv_bytes_per_token(model_config(path), itemsize)
    tokens = max(streams) * (max(contexts) + a.steps + 16)  # every stream at once
    if a.long_short:
        short, short_len, long_len = (int(x) for x in a.long_short.split(","))
        tokens = max(tokens, short * (short_len + 32) + long_len + 32)
    kv_gib = 1.1 * tokens * per_token / 2**30
    engine = LLMEngine.load(path, device=a.device, dtype=a.dtype, tokenizer=False, kv_cache_gib=max(kv_gib, 0.25))
    if a.fresh_gather:
        engine.runner.gather = None
    print(f"{path.name}: torch threads {torch.get_num_threads()}, dtype {a.dtype}, {a.steps} timed steps")
    print(f"{'context':>8} {'streams':>8} {'step ms':>9} {'tok/s':>8}")
    for context in contexts:
        for n in streams:
            s = measure(engine, n, context, a.steps)
            print(f"{context:>8} {n:>8} {s * 1e3:>9.1f} {n / s:>8.1f}", flush=True)
    if a.mixed:
        n, chunk = (int(x) for x in a.mixed.split(","))
        split, padded = mixed(engine, n, min(contexts), chunk)
        print(
            f"{n} decodes + a {chunk}-token chunk: separate forwards {split * 1e3:.1f} ms, one padded batch "
            f"{padded * 1e3:.1f} ms"
        )
    if a.long_short:
        short, short_len, long_len = (int(x) for x in a.long_short.split(","))
        for name, secs in long_short(engine, short, short_len, long_len).items():
            print(f"{short} x {short_len} + 1 x {long_len} tokens, {name}: {secs * 1e3:.1f} ms/step")
    for n in [int(s) for s in a.profile.split(",") if s]:
        profile(engine, n, max(contexts))


if __name__ == "__main__":
    main()
