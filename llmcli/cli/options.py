"""The typer options that several commands share (device, dtype, KV cache, sampling, speculation), and the
speculation flags turned into a decoder.

The engine and the model resolver are imported inside make_decoder, as the command bodies do them (`llm --help`
stays fast and lists the commands in their order).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import typer

from llmcli.config import COMPILE_MODES, KV_DTYPE_NAMES
from llmcli.engine.sampling_params import MAX_SEED, SettingError, expected_value, parse_setting
from llmcli.errors import UserError

DEVICE_HELP = "cpu or cuda (default: cuda when available)."
DTYPE_HELP = "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)."
DEQUANTIZE_HELP = "Expand a GGUF's Q4_0/Q4_1/Q8_0 weights to --dtype instead of running them quantized."

DEVICE = typer.Option(None, "--device", help=DEVICE_HELP)
DTYPE = typer.Option(None, "--dtype", help=DTYPE_HELP)
DEQUANTIZE = typer.Option(False, "--dequantize", help=DEQUANTIZE_HELP)


def positive_float(flag: str):
    """A parser for a flag that takes a finite number > 0 (typer's min= cannot exclude the bound itself)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise typer.BadParameter(f"{flag} must be a number > 0 (got {text!r})")
        return v

    return parse


def positive_int(flag: str, least: int = 1):
    """A parser for a flag that takes an integer >= least."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not an integer") from None
        if v < least:
            raise typer.BadParameter(f"{flag} must be an integer >= {least} (got {text!r})")
        return v

    return parse


def _setting(name: str):
    """A parser for a sampling flag: the rules of SamplingParams (parse_setting), the ones chat's /set applies."""

    def parse(text: str):
        try:
            return parse_setting(name, text)
        except SettingError:
            raise typer.BadParameter(f"{text.strip()!r} is not {expected_value(name)}") from None

    return parse


KV_CACHE_GIB = typer.Option(
    None,
    "--kv-cache-gib",
    parser=positive_float("--kv-cache-gib"),
    metavar="GIB",
    help="KV-cache size, > 0 (default: CPU the model's whole context, at most 1 GiB; CUDA most free memory).",
)


def one_of(names: tuple[str, ...]) -> Callable[[str], str]:
    """A typer parser that takes exactly one of `names` (a clear one-line error otherwise)."""

    def parse(text: str) -> str:
        if text not in names:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(names)}")
        return text

    return parse


KV_DTYPE = typer.Option(
    "auto",
    "--kv-dtype",
    parser=one_of(KV_DTYPE_NAMES),
    metavar="DTYPE",
    help="KV-cache format: auto (the compute dtype), bf16, fp16, fp32, int8 or fp8 (e4m3); int8/fp8 keep a scale "
    "per token and KV head, about half a 16-bit cache (MLA models: auto only).",
)

TENSOR_PARALLEL = typer.Option(
    1,
    "--tensor-parallel",
    "--tp",
    parser=positive_int("--tensor-parallel"),
    metavar="N",
    help="Split the model over N processes (one per GPU; on CPU they share the cores). Under torchrun: its ranks.",
)

# Sampling flags shared by `llm run` and `llm chat`: None = not given, so the model's generation_config.json or
# llama.cpp's defaults apply (SamplingParams.settle). Their ranges are SamplingParams' (parse_setting).
TEMPERATURE = typer.Option(
    None,
    "--temperature",
    "-t",
    parser=_setting("temperature"),
    metavar="FLOAT",
    help="A number >= 0; 0 = greedy (default 0.8, or the model's generation_config).",
)
TOP_K = typer.Option(
    None,
    "--top-k",
    parser=_setting("top_k"),
    metavar="INT",
    help="Keep the k likeliest tokens, k >= 0 (default 40; 0 = off).",
)
TOP_P = typer.Option(
    None,
    "--top-p",
    parser=_setting("top_p"),
    metavar="FLOAT",
    help="Nucleus sampling mass, in (0, 1] (default 0.95; 1 = off).",
)
MIN_P = typer.Option(
    None,
    "--min-p",
    parser=_setting("min_p"),
    metavar="FLOAT",
    help="Drop tokens below min_p x the top one, in [0, 1] (default 0.05; 0 = off).",
)
REPEAT_PENALTY = typer.Option(
    None,
    "--repeat-penalty",
    parser=_setting("repeat_penalty"),
    metavar="FLOAT",
    help="A number > 0; > 1 discourages repeats (default 1 = off).",
)
SEED = typer.Option(
    None,
    "--seed",
    parser=_setting("seed"),
    metavar="INT",
    help=f"Seed for reproducible sampling, 0 to {MAX_SEED} (-1: random, the default).",
)

# Speculative decoding, as `llm run` and `llm chat` offer it (`llm bench` words its help as a comparison).
DRAFT = typer.Option(None, "--draft", help="Draft model for speculative decoding (same tokenizer).")
SPECULATE = typer.Option(None, "--speculate", help="`ngram`: draft by looking up the context.")
NUM_DRAFT = typer.Option(None, "--num-draft", help="Tokens drafted per step (4 draft, 8 ngram).")


def make_decoder(
    target, draft: str | None = None, speculate: str | None = None, num_draft: int | None = None, **load_kw
):
    """--draft MODEL / --speculate ngram / --num-draft K -> a SpeculativeDecoder on target (None: plain decoding).

    The draft model is resolved like every MODEL argument and loaded with load_kw (device, dtype, kv_cache_gib)."""
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.speculative import SpeculativeDecoder
    from llmcli.tokenizer import load_tokenizer

    if draft is None and speculate is None:
        if num_draft is not None:
            raise UserError("--num-draft needs --draft MODEL or --speculate ngram")
        return None
    if speculate is not None and speculate != "ngram":
        raise UserError(f"--speculate supports only 'ngram', not {speculate!r} (use --draft MODEL for a draft model)")
    if draft is not None and speculate is not None:
        raise UserError("use either --draft MODEL or --speculate ngram, not both")
    if draft is None:
        return SpeculativeDecoder(target, None, method="ngram", num_draft=num_draft)
    path = resolve_model_spec(draft)
    engine = LLMEngine.load(path, tokenizer=False, **load_kw)
    try:  # only to compare vocabularies: a quantized copy may ship without tokenizer files (sizes are still checked)
        engine.tokenizer = load_tokenizer(path)
    except UserError:
        engine.tokenizer = None
    return SpeculativeDecoder(target, engine, method="draft", num_draft=num_draft)


COMPILE = typer.Option(
    "auto",
    "--compile",
    parser=one_of(COMPILE_MODES),
    metavar="MODE",
    help="Batch-1 decode as one compiled graph (torch.compile, kept on disk in the llmcli home): on (the first run "
    "of a model compiles, about a minute on CPU; later runs load it in about 10 s), off, or auto (for now off: a "
    "compiled start costs more than it saves on short replies).",
)


def apply_compile(engine, mode: str) -> None:
    """--compile MODE on a loaded engine; the compile's progress goes to stderr."""
    engine.set_compile(mode, on_event=_render_compile)


def _render_compile(event) -> None:
    if event.kind == "start":
        what = "loading the compiled decode step" if event.cached else "compiling the decode step (once per model)"
        print(f"{what}...", file=sys.stderr, flush=True)
    else:
        print(f"decode step ready in {event.seconds:.1f} s", file=sys.stderr, flush=True)
