"""`llm estimate MODEL`: exact parameters, memory, KV cache, FLOPs and GPU fit from the config alone.

This module only parses flags and renders: the config comes from hub.resolve.resolve_config_source (every name
`llm list` shows, a directory, config.json, .gguf metadata or a Hub repo's config.json) and every number from
llmcli.estimate; a GGUF's weights are its tensors as stored (hub.inspect.gguf_stored_weights) unless --dtype is
given. The library
is imported inside the command body so `llm --help` and completion stay fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.units import format_bytes

DEFAULT_CONTEXT = 4096  # capped at the model's max_position_embeddings

EXAMPLES = """
[bold]Examples[/bold]

  llm estimate meta-llama/Meta-Llama-3-8B --gpu RTX-4090 --dtype int4
  llm estimate ./Mixtral-8x7B -c 32768 -b 4 --kv-dtype fp8 --gpu H100-80GB
  llm estimate model.Q4_K_M.gguf --json
  llm estimate deepseek-ai/DeepSeek-V3 --dtype int4 --gpu-memory 640 --explain
"""


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    v = value.lower()
    if v not in allowed:
        raise UserError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    return v


def _gpu(gpu: str | None, gpu_memory: float | None) -> tuple[int | None, str | None]:
    """(bytes, label) of the GPU that --gpu or --gpu-memory names; (None, None) for neither."""
    from llmcli.estimate.gpus import GIB, find_gpu

    if gpu and gpu_memory is not None:
        raise UserError("give --gpu or --gpu-memory, not both")
    if gpu:
        g = find_gpu(gpu)
        return g.memory_bytes, g.name
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise UserError("--gpu-memory must be a positive number of GiB")
        return int(gpu_memory * GIB), f"{gpu_memory:g} GiB"
    return None, None


def _render(est, cfg, source: str, gpu_label: str | None, notes: list[str], share=None) -> None:
    from rich.console import Console
    from rich.table import Table

    def n(x: int) -> str:
        return f"{x:,}"

    def fmt_bytes(x: float) -> str:
        return format_bytes(x, binary=True)

    t = Table(title=f"{source}  ({cfg.family}, {cfg.num_layers} layers, d={cfg.hidden_size})", title_justify="left")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("", style="dim")
    t.add_row("parameters", n(est.params_total), f"{est.params_total / 1e9:.2f}B")
    if est.params_active != est.params_total:
        t.add_row("active per token", n(est.params_active), f"{est.params_active / 1e9:.2f}B")
    t.add_row("embedding / non-embedding", f"{n(est.params_embedding)} / {n(est.params_non_embedding)}", "")
    dt = est.dtype + (f" g{est.group_size}" if est.group_size else "")
    t.add_row(f"weights ({dt})", fmt_bytes(est.weight_bytes), n(est.weight_bytes) + " B")
    t.add_row(
        f"KV cache per token ({est.kv_dtype})", fmt_bytes(est.kv_bytes_per_token), n(est.kv_bytes_per_token) + " B"
    )
    t.add_row(f"KV cache ({est.context} tokens x {est.batch})", fmt_bytes(est.kv_bytes), n(est.kv_bytes) + " B")
    t.add_row("activations / workspace", fmt_bytes(est.activation_bytes), n(est.activation_bytes) + " B")
    t.add_row("[bold]total[/bold]", f"[bold]{fmt_bytes(est.total_bytes)}[/bold]", n(est.total_bytes) + " B")
    t.add_row(f"FLOPs per token (at {est.context})", f"{est.flops_per_token / 1e9:.2f} G", n(est.flops_per_token))
    if share:
        t.add_row(
            f"per device on {share.world} ranks: weights", fmt_bytes(share.weight_bytes), n(share.weight_bytes) + " B"
        )
        t.add_row("per device: KV cache", fmt_bytes(share.kv_bytes), n(share.kv_bytes) + " B")
        t.add_row("per device: total", fmt_bytes(share.total_bytes), n(share.total_bytes) + " B")
    if est.gpu_bytes is not None:
        verdict = "[green]fits[/green]" if est.fits else "[red]does not fit[/red]"
        t.add_row(f"{gpu_label} ({fmt_bytes(est.usable_bytes)} usable)", verdict, "")
        t.add_row(
            f"max context at batch {est.batch}",
            n(est.max_context),
            "model limit" if est.max_context == cfg.max_position_embeddings else "",
        )
        t.add_row(f"max batch at context {est.context}", n(est.max_batch), "")
    console = Console()
    console.print(t)
    for note in notes:
        console.print(f"[dim]note: {note}[/dim]")


@app.command("estimate", epilog=EXAMPLES)
def estimate(
    model: str | None = typer.Argument(
        None,
        help="A name from `llm list`, model directory, config.json, .gguf file or Hub repo id (REPO[:REVISION]); "
        "default: the built-in model.",
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="Weights: fp32, bf16, fp16, int8, int4, nf4. Default: the checkpoint's quantization (a GGUF's tensor "
        "types as stored), else bf16.",
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", help="int4 group size: 32, 64 or 128 (default 128, or the checkpoint's)."
    ),
    quantize_embeddings: bool = typer.Option(
        False, "--quantize-embeddings", help="Also quantize the token embedding and lm_head (else they stay 16-bit)."
    ),
    context: int | None = typer.Option(
        None,
        "--context",
        "-c",
        help=f"Tokens per sequence. Default: {DEFAULT_CONTEXT}, or the model's maximum if smaller.",
    ),
    batch: int = typer.Option(1, "--batch", "-b", help="Sequences held at once."),
    kv_dtype: str = typer.Option(
        "bf16",
        "--kv-dtype",
        help="KV cache: fp32, bf16, fp16, int8, fp8 (int8/fp8: a float16 scale per token and KV head, as `llm run` "
        "--kv-dtype caches them).",
    ),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU from the built-in table (e.g. H100-80GB, RTX-4090)."),
    gpu_memory: float | None = typer.Option(None, "--gpu-memory", help="GPU memory in GiB instead of --gpu."),
    explain: bool = typer.Option(False, "--explain", help="Show every formula with the numbers plugged in."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    tp: int = typer.Option(1, "--tensor-parallel", "--tp", min=1, metavar="N", help="Per device on N ranks."),
) -> None:
    """Exact parameters, weight memory, KV cache, FLOPs and GPU fit, from the config alone (no weights read)."""
    from llmcli import estimate as E
    from llmcli.estimate.explain import explain as explain_lines
    from llmcli.estimate.tensor_parallel import per_device
    from llmcli.formats import is_gguf
    from llmcli.hub.inspect import gguf_stored_weights
    from llmcli.hub.resolve import resolve_config_source

    cfg, source, local = resolve_config_source(model)

    notes = []
    stored, kinds = None, None
    q_dtype, q_group, q_emb = E.checkpoint_quantization(cfg)
    if dtype is None and local is not None and is_gguf(local):
        q_dtype, stored, kinds = gguf_stored_weights(local)
        notes.append(
            "weights: the GGUF's tensors as stored ("
            + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + "); --dtype estimates another type instead"
        )
    dtype = _choice(dtype, E.WEIGHT_DTYPES, "--dtype") if dtype else (q_dtype or "bf16")
    kv_dtype = _choice(kv_dtype, E.KV_DTYPES, "--kv-dtype")
    group_size = group_size or q_group or 128
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, not {group_size}")
    if context is None:
        context = min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context < 1 or batch < 1:
        raise UserError("--context and --batch must be at least 1")
    gpu_bytes, gpu_label = _gpu(gpu, gpu_memory)

    opts = E.Options(
        dtype=dtype,
        group_size=group_size,
        quantize_embeddings=quantize_embeddings or q_emb,
        context=context,
        batch=batch,
        kv_dtype=kv_dtype,
        gpu_bytes=gpu_bytes,
        stored_weight_bytes=stored,
    )
    est = E.estimate(cfg, opts)
    share = per_device(cfg, opts, tp) if tp > 1 else None
    if context > cfg.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    if as_json:
        d = {"model": source, **est.to_dict(), "max_position_embeddings": cfg.max_position_embeddings}
        if gpu_label:
            d["gpu"] = gpu_label
        if kinds:
            d["stored_tensor_types"] = kinds
        if share:
            d["per_device"] = asdict(share)
        if explain:
            d["explain"] = explain_lines(cfg, opts, est)
        typer.echo(json.dumps(d, indent=2))
        return
    _render(est, cfg, source, gpu_label, notes, share)
    if explain:
        typer.echo("\n".join(explain_lines(cfg, opts, est)))
