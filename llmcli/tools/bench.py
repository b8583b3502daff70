"""`llm bench`: prefill and decode throughput of the engine, optionally side by side with transformers or
with weight-only quantized versions of the same model (`--compare int8,int4`), or plain against speculative
decoding on a reply that copies a passage of its prompt (`--speculate ngram`, `--draft MODEL`).

Prompts are random token ids (seeded, different per row and per run) so the prefix cache never helps; every
measurement is preceded by a short warm-up. With compare, every engine runs in this process, alternating
rounds, and the best round of each is kept, so background load hits all alike. Quantized variants are
written by llmcli.quant.checkpoint into a temporary directory (deleted once loaded) and get the same KV
pool as the original.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcli.engine.llm_engine import LLMEngine
from llmcli.engine.loader import load_model
from llmcli.engine.sampling_params import SamplingParams
from llmcli.engine.speculative import SpecStats, SpeculativeDecoder
from llmcli.errors import UserError
from llmcli.formats import is_gguf
from llmcli.quant import QuantSpec
from llmcli.quant.checkpoint import quantize_checkpoint

# --compare name -> (bits, group size, method): what `llm quantize` writes by default for each, plus the smaller
# int4 groups (more accurate, slightly larger).
QUANT_VARIANTS: dict[str, tuple[int, int, str]] = {
    "int8": (8, 128, "rtn"),
    "int4": (4, 128, "hqq"),
    "int4-g64": (4, 64, "hqq"),
    "int4-g32": (4, 32, "hqq"),
}
ORIGINAL = "original"  # the engine label of the model as loaded, in a --compare int8,int4 run


def parse_compare(compare: str | None) -> str | list[str] | None:
    """--compare value -> None, "transformers", or the quantized variants to bench beside the model."""
    if compare is None or compare == "transformers":
        return compare
    names = list(dict.fromkeys(c.strip() for c in compare.split(",") if c.strip()))
    if not names or any(n not in QUANT_VARIANTS for n in names):
        raise UserError(
            f"--compare takes 'transformers' or a comma list of {', '.join(QUANT_VARIANTS)}, not {compare!r}"
        )
    return names


@dataclass
class BenchResult:
    engine: str
    batch: int
    prompt_len: int
    gen_len: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_memory_gib: float | None  # None: not measurable apart (transformers on CPU, same process)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 10), (batch, length), generator=g)


def bench_engine(engine, prompts: torch.Tensor, gen_len: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one batched generation of gen_len tokens per prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    seqs = [engine.add(p.tolist(), params) for p in prompts]
    try:
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.step(seqs)  # prefill: all prompts in one batch, yields each sequence's first token
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            engine.step(seqs)
        _sync(engine.device)
        t2 = time.perf_counter()
    finally:
        for s in seqs:
            engine.release(s)
    return t1 - t0, t2 - t1


def bench_transformers(model, prompts: torch.Tensor, gen_len: int, device: torch.device) -> tuple[float, float]:
    ids = prompts.to(device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(device)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kw)
        _sync(device)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, max(t2 - t1 - prefill, 1e-9)


def _result(
    name: str, batch: int, plen: int, glen: int, prefill: float, decode: float, mem: float | None
) -> BenchResult:
    return BenchResult(
        name, batch, plen, glen, prefill, batch * plen / prefill, batch * (glen - 1) / decode if glen > 1 else 0.0, mem
    )


def load_transformers(path, device: torch.device, dtype: torch.dtype):
    try:
        import transformers  # noqa: PLC0415  (optional heavy dependency, only for --compare transformers)
    except ImportError:
        raise UserError("--compare transformers needs the transformers package (pip install transformers)") from None
    p = Path(path)
    if is_gguf(p):
        model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    return model.to(device).eval()


def load_quantized(path, names: list[str], engine, log) -> list[tuple[str, object]]:
    """(label, engine) per variant: quantized from path into a temp dir, loaded like the original engine."""
    out = []
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        for name in names:
            bits, group, method = QUANT_VARIANTS[name]
            label = "int8" if bits == 8 else f"int4-g{group}"
            log(f"quantizing to {label} ({method}) ...")
            d = quantize_checkpoint(Path(path), Path(tmp) / name, QuantSpec(bits, group, method)).output
            model, config = load_model(d, engine.device, engine.dtype)  # weights are copied: the dir can go
            out.append((label, LLMEngine(model, config, num_blocks=len(engine.block_manager.blocks))))
    return out


def bench_quantized(
    engine, path, names: list[str], prompt_len: int, gen_len: int, batch: int, rounds: int, log
) -> list[BenchResult]:
    """The loaded model first (labelled ORIGINAL), then each quantized variant, rounds alternating."""
    if engine.config.raw.get("quantization_config"):
        raise UserError(f"--compare {','.join(names)} quantizes the model itself; give the unquantized original")
    vocab, dev = engine.config.vocab_size, engine.device
    bench_engine(engine, random_prompts(vocab, batch, min(prompt_len, 16), 1), 4)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    log(f"round 1: {ORIGINAL} ...")
    runs = {ORIGINAL: [bench_engine(engine, random_prompts(vocab, batch, prompt_len, 100), gen_len)]}
    mem = peak_memory_gib(dev)  # before the variants are loaded: the peak is the original's alone
    engines = [(ORIGINAL, engine)] + load_quantized(path, names, engine, log)
    for label, e in engines[1:]:
        bench_engine(e, random_prompts(vocab, batch, min(prompt_len, 16), 1), 4)  # kernel packing, allocator
        runs[label] = []
    for r in range(rounds):
        for label, e in engines:
            if r == 0 and label == ORIGINAL:
                continue  # measured above
            log(f"round {r + 1}: {label} ...")
            runs[label].append(bench_engine(e, random_prompts(vocab, batch, prompt_len, 100 + r), gen_len))
    best = lambda rs: (min(p for p, _ in rs), min(d for _, d in rs))  # noqa: E731
    # every variant shares the process with the original: only the original's peak is its own
    return [
        _result(label, batch, prompt_len, gen_len, *best(rs), mem if label == ORIGINAL else None)
        for label, rs in runs.items()
    ]


def decode_ratios(results: list[BenchResult]) -> dict[str, float]:
    """Each engine's decode tok/s over the first one's (the original model, or llmcli vs transformers)."""
    base = results[0].decode_tok_s
    return {r.engine: r.decode_tok_s / base if base else float("nan") for r in results}


def check_fits(engine, prompt_len: int, gen_len: int, batch: int) -> None:
    """UserError, with the numbers, when a sequence of prompt_len + gen_len tokens passes the engine's context, or
    batch of them do not fit its KV cache together (bench_engine steps every sequence to the end, no preemption)."""
    need = prompt_len + gen_len
    if need > engine.context_len:
        raise UserError(
            f"--prompt-len {prompt_len:,} + --gen-len {gen_len:,} = {need:,} tokens is past the context of "
            f"{engine.context_len:,} tokens (model {engine.config.max_position_embeddings:,}, "
            f"KV cache {engine.pool_tokens:,})"
        )
    bm = engine.block_manager
    blocks = batch * bm.blocks_needed(need)
    if blocks > len(bm.blocks):
        raise UserError(
            f"--batch {batch} sequences of {need:,} tokens need {blocks * bm.block_size:,} tokens of KV cache; "
            f"it holds {engine.pool_tokens:,}: lower --batch or raise --kv-cache-gib"
        )


def run_bench(
    engine, path, prompt_len: int, gen_len: int, batch: int, compare: str | None = None, rounds: int = 2, log=None
) -> list[BenchResult]:
    if prompt_len < 1 or gen_len < 1 or batch < 1:
        raise UserError("--prompt-len, --gen-len and --batch must be at least 1")
    check_fits(engine, prompt_len, gen_len, batch)
    log = log or (lambda msg: None)
    variants = parse_compare(compare)
    if isinstance(variants, list):
        return bench_quantized(engine, path, variants, prompt_len, gen_len, batch, rounds, log)
    vocab = engine.config.vocab_size
    dev = engine.device
    bench_engine(engine, random_prompts(vocab, batch, min(prompt_len, 16), 1), 4)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    log("round 1: llmcli ...")
    ours = [bench_engine(engine, random_prompts(vocab, batch, prompt_len, 100), gen_len)]
    mem = peak_memory_gib(dev)  # before transformers is loaded: the process peak is ours alone
    theirs: list[tuple[float, float]] = []
    if compare:
        log("loading the model in transformers ...")
        ref = load_transformers(path, dev, engine.dtype)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        bench_transformers(ref, random_prompts(vocab, batch, min(prompt_len, 16), 2), 4, dev)  # warm-up
        for r in range(rounds):
            if r:
                log(f"round {r + 1}: llmcli ...")
                ours.append(bench_engine(engine, random_prompts(vocab, batch, prompt_len, 100 + r), gen_len))
            log(f"round {r + 1}: transformers ...")
            theirs.append(bench_transformers(ref, random_prompts(vocab, batch, prompt_len, 100 + r), gen_len, dev))
    best = lambda runs: (min(p for p, _ in runs), min(d for _, d in runs))  # noqa: E731
    results = [_result("llmcli", batch, prompt_len, gen_len, *best(ours), mem)]
    if theirs:
        # on CPU the process peak includes both models, so only CUDA reports transformers' own peak
        their_mem = peak_memory_gib(dev) if dev.type == "cuda" else None
        results.append(_result("transformers", batch, prompt_len, gen_len, *best(theirs), their_mem))
    return results


# ---- plain vs speculative decoding ----------------------------------------------------------------------------------

# A workload speculation is made for: the reply copies a passage that is in the prompt.
PASSAGE = (
    "The old lighthouse stood at the edge of the cliff for over a hundred years. Every night its beam swept "
    "across the dark water, guiding fishing boats safely back to the harbor. The keeper, a quiet man named "
    "Elias, climbed the spiral stairs each evening to light the lamp and wind the clockwork that turned it. "
    "In winter the storms came without warning, and more than once he stayed awake until dawn, watching the "
    "waves break against the rocks below and listening for the horns of ships lost in the fog."
)
REPEAT_PROMPT = "Repeat the following passage exactly, word for word, and say nothing else:\n\n" + PASSAGE


@dataclass
class SpeedComparison:
    plain_tok_s: float
    spec_tok_s: float
    identical: bool  # greedy: the speculative reply equals the plain one, token for token
    stats: SpecStats
    tokens: int

    @property
    def speedup(self) -> float:
        return self.spec_tok_s / self.plain_tok_s if self.plain_tok_s else 0.0

    def to_dict(self) -> dict:
        return {
            "plain_decode_tok_s": round(self.plain_tok_s, 2),
            "speculative_decode_tok_s": round(self.spec_tok_s, 2),
            "speedup": round(self.speedup, 3),
            "identical_output": self.identical,
            "generated_tokens": self.tokens,
            **self.stats.to_dict(),
        }


def compare_speed(decoder: SpeculativeDecoder, prompt_ids: list[int], params: SamplingParams) -> SpeedComparison:
    """Generate the same reply plainly and speculatively (decode tok/s after the first token of each)."""
    plain = list(decoder.target.stream(prompt_ids, params))
    spec = list(decoder.stream(prompt_ids, params))
    return SpeedComparison(
        plain[-1].stats.decode_tok_s,
        spec[-1].stats.decode_tok_s,
        [e.token_id for e in plain] == [e.token_id for e in spec],
        decoder.stats,
        len(spec),
    )
