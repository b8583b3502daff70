"""`llm run` (one prompt, streamed reply) and `llm bench` (prefill/decode throughput)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from llmcli.cli import app
from llmcli.errors import UserError

DEVICE_HELP = "cpu or cuda (default: cuda when available)."
DTYPE_HELP = "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)."
DEQUANTIZE_HELP = "Expand a GGUF's Q4_0/Q4_1/Q8_0 weights to --dtype instead of running them quantized."
# Sampling flags shared by `llm run` and `llm chat`: None = not given, so the model's generation_config.json or
# llama.cpp's defaults apply (llmcli.chat.sampling_settings).
TEMPERATURE = typer.Option(None, "--temperature", "-t", min=0.0,
                           help="0 = greedy (default 0.8, or the model's generation_config).")
TOP_K = typer.Option(None, "--top-k", min=0, help="Keep the k likeliest tokens (default 40; 0 = off).")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (default 0.95).")
MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0, help="Drop tokens below min_p x the top one (default 0.05).")
REPEAT_PENALTY = typer.Option(None, "--repeat-penalty", min=0.0, help="> 1 discourages repeats (default 1).")
SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")


def _split_args(model_or_prompt: str, prompt: Optional[str]) -> tuple[Optional[str], str]:
    """`llm run PROMPT` uses the default model; `llm run MODEL PROMPT` names one. `-` reads the prompt from stdin."""
    model, text = (None, model_or_prompt) if prompt is None else (model_or_prompt, prompt)
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise UserError("the prompt is empty")
    return model, text


def _prompt_ids(engine, text: str, system: Optional[str], raw: bool) -> list[int]:
    tok = engine.tokenizer
    if tok is None:
        raise UserError("this model has no tokenizer")
    if raw:
        if system:
            raise UserError("--system needs the chat template; drop --raw")
        return list(tok.encode(text))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    if hasattr(tok, "encode_chat"):
        return list(tok.encode_chat(messages))
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def _stream_decoder(tok):
    """A callable token_id -> new text, and a flush() -> remaining text."""
    from llmcli.tokenizer import StreamDecoder

    return StreamDecoder(tok)


@app.command("run", epilog="[bold]Examples[/bold]\n\n  llm run 'What is the capital of France?'\n  llm run ./Qwen2.5-0.5B-Instruct 'Write a haiku' --temperature 0.7 --seed 1\n  cat notes.txt | llm run - --system 'Summarize this.' --json\n  llm run 'Repeat: ...' --speculate ngram --temperature 0")
def run(
    model_or_prompt: str = typer.Argument(..., metavar="[MODEL] PROMPT",
                                          help="Model (directory, .gguf or store name) then the prompt; `-` reads stdin."),
    prompt: Optional[str] = typer.Argument(None, hidden=True),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: Optional[float] = TEMPERATURE,
    top_k: Optional[int] = TOP_K,
    top_p: Optional[float] = TOP_P,
    min_p: Optional[float] = MIN_P,
    repeat_penalty: Optional[float] = REPEAT_PENALTY,
    seed: Optional[int] = SEED,
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    dequantize: bool = typer.Option(False, "--dequantize", help=DEQUANTIZE_HELP),
    kv_cache_gib: Optional[float] = typer.Option(None, "--kv-cache-gib", help="KV-cache size (default: CPU 1 GiB, CUDA most free memory)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings)."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model for speculative decoding (same tokenizer)."),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="`ngram`: draft by looking up the context."),
    num_draft: Optional[int] = typer.Option(None, "--num-draft", help="Tokens drafted per step (4 draft, 8 ngram)."),
) -> None:
    """Generate a reply to one prompt, streamed to stdout (stats go to stderr)."""
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sequence import SamplingParams

    from llmcli.chat import sampling_settings
    from llmcli.cli.resolve import resolve_model_spec

    model, text = _split_args(model_or_prompt, prompt)
    path = resolve_model_spec(model)
    s = sampling_settings(path, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty)
    engine = LLMEngine.load(path, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, dequantize=dequantize)
    ids = _prompt_ids(engine, text, system, raw)
    params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                            repetition_penalty=s.repeat_penalty, seed=seed, max_tokens=max_tokens,
                            ignore_eos=ignore_eos)
    decoder = _stream_decoder(engine.tokenizer)
    out_ids: list[int] = []
    stats = None
    eos = engine.eos_token_ids
    from llmcli.layers.moe import expert_usage, reset_expert_usage

    reset_expert_usage(engine.model)  # MoE router statistics cover this generation only
    from llmcli.engine.speculative import make_decoder, run_summary

    spec = make_decoder(engine, draft, speculate, num_draft, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib)
    for ev in (spec or engine).stream(ids, params):
        stats = ev.stats
        out_ids.append(ev.token_id)
        if ev.token_id in eos and not ignore_eos:
            continue  # the end-of-turn marker is not part of the reply
        piece = decoder.push(ev.token_id)
        if piece and not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = decoder.flush()
    if tail and not as_json:
        sys.stdout.write(tail)
    reply_ids = [t for t in out_ids if ignore_eos or t not in eos]
    s = stats.to_dict() if stats else {"prompt_tokens": len(ids), "generated_tokens": 0}
    if spec and stats:  # acceptance, mean accepted per step, speed-up vs a short plain decode
        s["speculative"] = run_summary(spec, ids, stats.decode_tok_s)
    if as_json:
        out = {"text": engine.tokenizer.decode(reply_ids), **s}
        usage = expert_usage(engine.model)
        if usage:  # MoE: tokens routed to each expert, per sparse layer index
            out["expert_usage"] = {str(i): counts for i, counts in usage.items()}
        print(json.dumps(out))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        cached = f" ({stats.cached_prompt_tokens} cached)" if stats.cached_prompt_tokens else ""
        print(f"prompt {stats.prompt_tokens} tokens{cached}, TTFT {stats.ttft_s * 1000:.0f} ms, "
              f"{stats.generated_tokens} tokens at {stats.decode_tok_s:.1f} tok/s", file=sys.stderr)
        if spec:
            sp = s["speculative"]
            print(f"speculative: {sp['acceptance_rate']:.0%} of {sp['drafted']} drafts accepted, "
                  f"{sp['mean_accepted']:.2f} per step, speed-up ~{sp['speedup_est']}x", file=sys.stderr)


@app.command("bench", epilog="[bold]Examples[/bold]\n\n  llm bench\n  llm bench --compare transformers --json\n  llm bench ./model --prompt-len 512 --gen-len 128 --batch 4\n  llm bench --speculate ngram")
def bench(
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M)."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, help="Prompt tokens per sequence."),
    gen_len: int = typer.Option(64, "--gen-len", min=1, help="Tokens generated per sequence."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
    compare: Optional[str] = typer.Option(None, "--compare", help="`transformers`: run its generate() side by side; "
                                          "`int8,int4` (also int4-g64, int4-g32): quantize the model to temp dirs "
                                          "and bench each beside it."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Alternating rounds with --compare; the best is kept."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    dequantize: bool = typer.Option(False, "--dequantize", help=DEQUANTIZE_HELP),
    kv_cache_gib: Optional[float] = typer.Option(None, "--kv-cache-gib", help="KV-cache size."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Compare plain vs speculative decoding with this draft."),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="`ngram`: compare plain vs n-gram speculation."),
    num_draft: Optional[int] = typer.Option(None, "--num-draft", help="Tokens drafted per step."),
) -> None:
    """Measure prefill and decode speed (tok/s), time to first token and peak memory."""
    from llmcli.tools.bench import decode_ratios, parse_compare, run_bench
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.cli.resolve import resolve_model_spec

    quant_compare = isinstance(parse_compare(compare), list)  # validated before any model is loaded
    path = resolve_model_spec(model)
    if draft is not None or speculate is not None or num_draft is not None:
        # speculation needs real text to be worth anything: a reply that copies a passage from the prompt
        from llmcli.engine.speculative import REPEAT_PROMPT, compare_speed, make_decoder
        from llmcli.engine.sequence import SamplingParams

        engine = LLMEngine.load(path, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, dequantize=dequantize)
        spec = make_decoder(engine, draft, speculate, num_draft, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib)
        r = compare_speed(spec, _prompt_ids(engine, REPEAT_PROMPT, None, False),
                          SamplingParams(temperature=0.0, max_tokens=gen_len)).to_dict()
        if as_json:
            print(json.dumps({"model": str(path), "draft": draft or speculate, "device": str(engine.device), **r}))
            return
        print(f"{path.name}  speculative ({draft or speculate}, K={spec.num_draft})  device={engine.device}  "
              f"{r['generated_tokens']} tokens, repeat-a-passage prompt")
        print(f"plain {r['plain_decode_tok_s']:.1f} tok/s, speculative {r['speculative_decode_tok_s']:.1f} tok/s: "
              f"speed-up {r['speedup']:.2f}x; acceptance {r['acceptance_rate']:.0%}, "
              f"{r['mean_accepted']:.2f} accepted per step; identical output: {r['identical_output']}")
        return
    engine = LLMEngine.load(path, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, tokenizer=False,
                            dequantize=dequantize)
    log = (lambda m: None) if as_json else (lambda m: print(m, file=sys.stderr))
    results = run_bench(engine, path, prompt_len, gen_len, batch, compare, rounds=rounds, log=log)
    from llmcli.estimate import count_params
    from llmcli.units import format_count

    pc = count_params(engine.config)  # MoE: a token multiplies only its k routed experts
    if as_json:
        out = {"model": str(path), "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
               "params_total": pc.total, "params_active_per_token": pc.active,
               "results": [r.to_dict() for r in results]}
        if quant_compare:
            out["decode_vs_original"] = decode_ratios(results)
        elif len(results) == 2:
            out["decode_speedup"] = results[0].decode_tok_s / results[1].decode_tok_s
            out["prefill_speedup"] = results[0].prefill_tok_s / results[1].prefill_tok_s
        print(json.dumps(out))
        return
    print(f"{path.name}  device={engine.device}  dtype={str(engine.dtype).replace('torch.', '')}  "
          f"batch={batch} prompt={prompt_len} gen={gen_len}")
    print(f"parameters: {format_count(pc.total, significant=True)} total, "
          f"{format_count(pc.active, significant=True)} active per token")
    ratio = decode_ratios(results) if quant_compare else None
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>10}{'peak GiB':>10}"
          + (f"{'decode x':>10}" if ratio else ""))
    for r in results:
        mem = f"{r.peak_memory_gib:>10.2f}" if r.peak_memory_gib is not None else f"{'-':>10}"
        print(f"{r.engine:<14}{r.prefill_tok_s:>15.1f}{r.decode_tok_s:>14.1f}{r.ttft_s * 1000:>10.1f}{mem}"
              + (f"{ratio[r.engine]:>9.2f}x" if ratio else ""))
    if len(results) == 2 and not quant_compare:
        print(f"speedup: decode {results[0].decode_tok_s / results[1].decode_tok_s:.2f}x, "
              f"prefill {results[0].prefill_tok_s / results[1].prefill_tok_s:.2f}x")
