"""`llm run`: one prompt, its reply streamed to stdout (stats to stderr), or one JSON object.

The engine is imported inside the command body so `llm --help` and completion stay fast, and so is the model
resolver: it imports `llm pull`'s module, which would otherwise be listed in `llm --help` before this command.
"""

from __future__ import annotations

import json
import sys

import typer

from llmcli.cli import app
from llmcli.cli.options import (
    COMPILE,
    DEQUANTIZE,
    DEVICE,
    DRAFT,
    DTYPE,
    KV_CACHE_GIB,
    KV_DTYPE,
    MIN_P,
    NUM_DRAFT,
    REPEAT_PENALTY,
    SEED,
    SPECULATE,
    TEMPERATURE,
    TENSOR_PARALLEL,
    TOP_K,
    TOP_P,
    apply_compile,
    make_decoder,
)
from llmcli.errors import UserError

DEFAULT_MAX_TOKENS = 512


def _split_args(model_or_prompt: str, prompt: str | None) -> tuple[str | None, str]:
    """`llm run PROMPT` uses the default model; `llm run MODEL PROMPT` names one. `-` reads the prompt from stdin.

    Bytes that are not UTF-8 (in argv, which Python hands over as surrogate escapes, or on stdin, read as bytes
    whatever the locale) are replaced with U+FFFD by valid_text, with a warning that says how many."""
    from llmcli.engine.text import valid_text

    model, text = (None, model_or_prompt) if prompt is None else (model_or_prompt, prompt)
    if text == "-":
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    clean = valid_text(text)
    if clean != text:
        bad = clean.count("\ufffd") - text.count("\ufffd")
        warn = f"warning: the prompt is not valid UTF-8; {bad} undecodable sequence(s) replaced with U+FFFD"
        print(warn, file=sys.stderr)
    if not clean.strip():
        raise UserError("the prompt is empty")
    return model, clean


def _context_note(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Say up front, with the numbers, when the reply will stop at the context before --max-tokens."""
    if prompt_tokens + max_tokens > context:
        print(
            f"note: the prompt is {prompt_tokens:,} tokens and the context {context:,}: the reply stops at "
            f"{context - prompt_tokens:,} tokens (finish_reason length), before --max-tokens {max_tokens:,}",
            file=sys.stderr,
        )


def _prompt_ids(tokenizer, text: str, system: str | None, raw: bool) -> list[int]:
    """The prompt through the chat template (with the system message), or with --raw the text's own ids."""
    from llmcli.engine.text import prompt_ids, text_ids

    if tokenizer is None:
        raise UserError("this model has no tokenizer")
    if raw:
        if system:
            raise UserError("--system needs the chat template; drop --raw")
        return text_ids(tokenizer, text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return prompt_ids(tokenizer, messages)


def _exit_if_interrupted(interrupted: bool, generated: int) -> None:
    """After Ctrl-C: say so on stderr and exit 130 (typer turns a KeyboardInterrupt inside a command into a silent
    exit 130, so the command says it itself)."""
    if interrupted:
        print(f"interrupted after {generated} generated token(s)", file=sys.stderr)
        raise typer.Exit(130)


EXAMPLES = (
    "[bold]Examples[/bold]\n\n  llm run 'What is the capital of France?'\n"
    "  llm run ./Qwen2.5-0.5B-Instruct 'Write a haiku' --temperature 0.7 --seed 1\n"
    "  cat notes.txt | llm run - --system 'Summarize this.' --json\n"
    "  llm run 'Repeat: ...' --speculate ngram --temperature 0"
)


@app.command("run", epilog=EXAMPLES)
def run(
    model_or_prompt: str = typer.Argument(
        ..., metavar="[MODEL] PROMPT", help="Model (directory, .gguf or store name) then the prompt; `-` reads stdin."
    ),
    prompt: str | None = typer.Argument(None, hidden=True),
    system: str | None = typer.Option(None, "--system", help="System message for the chat template."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: float | None = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    seed: int | None = SEED,
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    dequantize: bool = DEQUANTIZE,
    kv_cache_gib: float | None = KV_CACHE_GIB,
    kv_dtype: str = KV_DTYPE,
    tp: int = TENSOR_PARALLEL,
    compile_mode: str = COMPILE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings)."),
    draft: str | None = DRAFT,
    speculate: str | None = SPECULATE,
    num_draft: int | None = NUM_DRAFT,
) -> None:
    """Generate a reply to one prompt, streamed to stdout (stats go to stderr)."""
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.engine.llm_engine import GenerationStats
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.speculative import run_summary
    from llmcli.engine.text import TextStream
    from llmcli.engine.tp import load_engine
    from llmcli.layers.moe import expert_usage, reset_expert_usage

    model, text = _split_args(model_or_prompt, prompt)
    path = resolve_model_spec(model)
    params = SamplingParams.settle(
        path,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repeat_penalty,
        seed=seed,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
    )
    engine = load_engine(path, tp, device, dtype, kv_cache_gib=kv_cache_gib, kv_dtype=kv_dtype, dequantize=dequantize)
    apply_compile(engine, compile_mode)
    ids = _prompt_ids(engine.tokenizer, text, system, raw)
    engine.check_prompt(ids, params)  # a prompt past the context is refused before any draft model or prefill
    _context_note(len(ids), params.max_tokens, engine.context_len)
    reset_expert_usage(engine.model)  # MoE router statistics cover this generation only
    spec = make_decoder(
        engine, draft, speculate, num_draft, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, kv_dtype=kv_dtype
    )
    reply = TextStream(engine.tokenizer, engine.eos_token_ids, keep_eos=ignore_eos)
    interrupted = False
    try:
        for piece in reply.pieces((spec or engine).stream(ids, params)):
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C: what was generated is kept (printed, or in the JSON below), exit 130
        interrupted = True
    stats = reply.stats or GenerationStats(prompt_tokens=len(ids))
    s = stats.to_dict()
    if interrupted:
        s["finish_reason"] = "interrupted"
    elif spec and reply.stats:  # acceptance, mean accepted per step, speed-up vs a short plain decode
        s["speculative"] = run_summary(spec, ids, stats.decode_tok_s)
    if as_json:
        out = {"text": engine.tokenizer.decode(reply.token_ids), **s}
        usage = expert_usage(engine.model)
        if usage:  # MoE: tokens routed to each expert, per sparse layer index
            out["expert_usage"] = {str(i): counts for i, counts in usage.items()}
        print(json.dumps(out), flush=True)
        _exit_if_interrupted(interrupted, stats.generated_tokens)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    _exit_if_interrupted(interrupted, stats.generated_tokens)
    cached = f" ({stats.cached_prompt_tokens} cached)" if stats.cached_prompt_tokens else ""
    print(
        f"prompt {stats.prompt_tokens} tokens{cached}, TTFT {stats.ttft_s * 1000:.0f} ms, "
        f"{stats.generated_tokens} tokens at {stats.decode_tok_s:.1f} tok/s",
        file=sys.stderr,
    )
    sp = s.get("speculative")  # absent when nothing was generated (--max-tokens 0)
    if sp:
        print(
            f"speculative: {sp['acceptance_rate']:.0%} of {sp['drafted']} drafts accepted, "
            f"{sp['mean_accepted']:.2f} per step, speed-up ~{sp['speedup_est']}x",
            file=sys.stderr,
        )
