"""`llm bench`: prefill and decode throughput, beside transformers or quantized copies, or plain against
speculative decoding.

The engine and the measurements are imported inside the command body so `llm --help` and completion stay fast,
and so is the model resolver: it imports `llm pull`'s module, which would otherwise be listed in `llm --help`
before this command.
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
    DTYPE,
    KV_CACHE_GIB,
    KV_DTYPE,
    TENSOR_PARALLEL,
    apply_compile,
    make_decoder,
)
from llmcli.errors import UserError

EXAMPLES = (
    "[bold]Examples[/bold]\n\n  llm bench\n  llm bench --compare transformers --json\n"
    "  llm bench ./model --prompt-len 512 --gen-len 128 --batch 4\n  llm bench --speculate ngram"
)


@app.command("bench", epilog=EXAMPLES)
def bench(
    model: str | None = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M)."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, help="Prompt tokens per sequence."),
    gen_len: int = typer.Option(64, "--gen-len", min=1, help="Tokens generated per sequence."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
    compare: str | None = typer.Option(
        None,
        "--compare",
        help="`transformers`: run its generate() side by side; "
        "`int8,int4` (also int4-g64, int4-g32): quantize the model to temp dirs "
        "and bench each beside it.",
    ),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Alternating rounds with --compare; the best is kept."),
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    dequantize: bool = DEQUANTIZE,
    kv_cache_gib: float | None = KV_CACHE_GIB,
    kv_dtype: str = KV_DTYPE,
    tp: int = TENSOR_PARALLEL,
    compile_mode: str = COMPILE,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    draft: str | None = typer.Option(None, "--draft", help="Compare plain vs speculative decoding with this draft."),
    speculate: str | None = typer.Option(None, "--speculate", help="`ngram`: compare plain vs n-gram speculation."),
    num_draft: int | None = typer.Option(None, "--num-draft", help="Tokens drafted per step."),
) -> None:
    """Measure prefill and decode speed (tok/s), time to first token and peak memory."""
    from llmcli.cli.resolve import resolve_model_spec
    from llmcli.engine.llm_engine import check_context
    from llmcli.engine.tp import load_engine
    from llmcli.hub.inspect import model_config
    from llmcli.tools.bench import parse_compare

    quant_compare = isinstance(parse_compare(compare), list)  # validated before any model is loaded
    path = resolve_model_spec(model)
    if draft is not None or speculate is not None or num_draft is not None:
        engine = load_engine(
            path, tp, device, dtype, kv_cache_gib=kv_cache_gib, kv_dtype=kv_dtype, dequantize=dequantize
        )
        apply_compile(engine, compile_mode)
        spec = make_decoder(
            engine,
            draft,
            speculate,
            num_draft,
            device=device,
            dtype=dtype,
            kv_cache_gib=kv_cache_gib,
            kv_dtype=kv_dtype,
        )
        _speculation(path, engine, spec, draft or speculate, gen_len, as_json)
        return
    need = prompt_len + gen_len  # the context, from the config alone: before the weights load
    check_context(model_config(path), need, f"--prompt-len {prompt_len:,} + --gen-len {gen_len:,} = {need:,} tokens")
    if tp > 1 and compare is not None:
        raise UserError("--compare loads more models beside this one; run it without --tensor-parallel")
    engine = load_engine(
        path,
        tp,
        device,
        dtype,
        kv_cache_gib=kv_cache_gib,
        kv_dtype=kv_dtype,
        tokenizer=False,
        dequantize=dequantize,
        max_batch=batch,
    )
    apply_compile(engine, compile_mode)
    _throughput(path, engine, prompt_len, gen_len, batch, compare, rounds, quant_compare, as_json)


def _speculation(path, engine, spec, drafter: str, gen_len: int, as_json: bool) -> None:
    """Plain vs speculative decoding of one greedy reply; speculation needs real text to be worth anything: a reply
    that copies a passage from the prompt."""
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.text import prompt_ids
    from llmcli.tools.bench import REPEAT_PROMPT, compare_speed

    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": REPEAT_PROMPT}])
    r = compare_speed(spec, ids, SamplingParams(temperature=0.0, max_tokens=gen_len)).to_dict()
    if as_json:
        print(json.dumps({"model": str(path), "draft": drafter, "device": str(engine.device), **r}))
        return
    print(
        f"{path.name}  speculative ({drafter}, K={spec.num_draft})  device={engine.device}  "
        f"{r['generated_tokens']} tokens, repeat-a-passage prompt"
    )
    print(
        f"plain {r['plain_decode_tok_s']:.1f} tok/s, speculative {r['speculative_decode_tok_s']:.1f} tok/s: "
        f"speed-up {r['speedup']:.2f}x; acceptance {r['acceptance_rate']:.0%}, "
        f"{r['mean_accepted']:.2f} accepted per step; identical output: {r['identical_output']}"
    )


def _throughput(
    path,
    engine,
    prompt_len: int,
    gen_len: int,
    batch: int,
    compare: str | None,
    rounds: int,
    quant_compare: bool,
    as_json: bool,
) -> None:
    """Prefill/decode tok/s, TTFT and peak memory of the engine (and what --compare puts beside it)."""
    from llmcli.estimate import count_params
    from llmcli.tools.bench import decode_ratios, run_bench
    from llmcli.units import format_count

    log = (lambda m: None) if as_json else (lambda m: print(m, file=sys.stderr))
    results = run_bench(engine, path, prompt_len, gen_len, batch, compare, rounds=rounds, log=log)
    pc = count_params(engine.config)  # MoE: a token multiplies only its k routed experts
    if as_json:
        out = {
            "model": str(path),
            "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "params_total": pc.total,
            "params_active_per_token": pc.active,
            "results": [r.to_dict() for r in results],
        }
        if quant_compare:
            out["decode_vs_original"] = decode_ratios(results)
        elif len(results) == 2:
            out["decode_speedup"] = results[0].decode_tok_s / results[1].decode_tok_s
            out["prefill_speedup"] = results[0].prefill_tok_s / results[1].prefill_tok_s
        print(json.dumps(out))
        return
    print(
        f"{path.name}  device={engine.device}  dtype={str(engine.dtype).replace('torch.', '')}  "
        f"batch={batch} prompt={prompt_len} gen={gen_len}"
    )
    print(
        f"parameters: {format_count(pc.total, significant=True)} total, "
        f"{format_count(pc.active, significant=True)} active per token"
    )
    ratio = decode_ratios(results) if quant_compare else None
    print(
        f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>10}{'peak GiB':>10}"
        + (f"{'decode x':>10}" if ratio else "")
    )
    for r in results:
        mem = f"{r.peak_memory_gib:>10.2f}" if r.peak_memory_gib is not None else f"{'-':>10}"
        print(
            f"{r.engine:<14}{r.prefill_tok_s:>15.1f}{r.decode_tok_s:>14.1f}{r.ttft_s * 1000:>10.1f}{mem}"
            + (f"{ratio[r.engine]:>9.2f}x" if ratio else "")
        )
    if len(results) == 2 and not quant_compare:
        print(
            f"speedup: decode {results[0].decode_tok_s / results[1].decode_tok_s:.2f}x, "
            f"prefill {results[0].prefill_tok_s / results[1].prefill_tok_s:.2f}x"
        )
