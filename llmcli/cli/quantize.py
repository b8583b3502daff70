"""`llm quantize`: parse, call llmcli.quant (and llmcli.tools for calibration and --eval), render the summary.

The torch-heavy library is imported inside the command body so `llm --help` and completion stay fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from llmcli.cli import app
from llmcli.cli.resolve import resolve_model_spec
from llmcli.errors import UserError
from llmcli.formats import is_gguf
from llmcli.hub import default_model
from llmcli.paths import store_dir
from llmcli.units import format_bytes


def _default_name(src: Path) -> str:
    if is_gguf(src):
        if src.name == default_model.GGUF_NAME:
            return default_model.NAME
        # drop llama.cpp's quant tag: Foo-7B.Q4_K_M.gguf -> Foo-7B
        return re.sub(r"[.-](Q\d\w*|F16|F32|BF16)$", "", src.stem, flags=re.I).lower()
    return src.name.lower()


def _output_dir(src: Path, bits: int, group_size: int, method: str, fmt: str, gguf_type: str = "") -> Path:
    name = _default_name(src)
    if fmt == "gguf":
        tag = (gguf_type or ("q8_0" if bits == 8 else "q4_1")).upper()
        return store_dir() / f"{name}.{tag}.gguf"
    if method == "nf4":
        return store_dir() / f"{name}-nf4"
    base = f"{name}-int8" if bits == 8 else f"{name}-int4-g{group_size}"
    return store_dir() / (base + {"compressed-tensors": "-ct", "gptq": "-gptq"}.get(fmt, ""))


EXAMPLES = (
    "[bold]Examples[/bold]\n\n"
    "  llm quantize --bits 8\n"
    "  llm quantize Qwen/Qwen2.5-0.5B-Instruct --bits 4 --group-size 64 --method hqq\n"
    "  llm quantize ./model --bits 4 --method gptq --calibration text.txt\n"
    "  llm quantize ./model --method nf4 --output ./model-nf4\n"
    "  llm quantize --bits 4 --format gguf --gguf-type q4_1\n"
    "  llm quantize ./model --bits 4 --format compressed-tensors   (vLLM, SGLang; transformers: dequantize=True)\n"
    "  llm quantize ./model --bits 4 --format gptq --method gptq --calibration text.txt"
)
FORMATS = ("llmcli", "gguf", "compressed-tensors", "gptq")


@app.command("quantize", epilog=EXAMPLES)
def quantize(
    model: str | None = typer.Argument(
        None, help="Model directory, .gguf file or store name (default: the built-in model)."
    ),
    bits: int = typer.Option(8, "--bits", "-b", help="8 or 4."),
    group_size: int = typer.Option(128, "--group-size", "-g", help="INT4 group size: 32, 64 or 128."),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="rtn | hqq | gptq | nf4 (default: hqq for 4 bits in the llmcli and gguf formats, else rtn).",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Output directory, or .gguf file with --format gguf (default: in the llmcli store, shown by `llm list`).",
    ),
    fmt: str = typer.Option(
        "llmcli",
        "--format",
        help="llmcli (safetensors directory), gguf, or for vLLM/SGLang: compressed-tensors (INT4 asymmetric, "
        "INT8 per channel) or gptq (INT4 symmetric).",
    ),
    gguf_type: str | None = typer.Option(
        None, "--gguf-type", help="GGUF weight type: q8_0, q4_0, q4_1 or f16 (default: q8_0 for 8 bits, q4_1 for 4)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Text file for GPTQ calibration (gptq; optional for nf4)."
    ),
    eval_file: Path | None = typer.Option(None, "--eval", help="Text file: report perplexity before and after."),
    quantize_embeddings: bool = typer.Option(
        False,
        "--quantize-embeddings",
        help="Also quantize the token embedding and lm_head (one shared table when tied).",
    ),
    force: bool = typer.Option(
        False, "--force", "-f", help="Overwrite an existing output (never the source model itself)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write an INT8/INT4/NF4 weight-only checkpoint, a GGUF (Q8_0/Q4_0/Q4_1) with --format gguf, or one vLLM and
    SGLang load with --format compressed-tensors / gptq."""
    from llmcli.quant import QuantSpec
    from llmcli.quant.checkpoint import check_output, quantize_checkpoint, resolve_source_spec
    from llmcli.quant.gguf_writer import check_gguf_type, write_gguf
    from llmcli.tools.calibration import collect_hessians
    from llmcli.tools.perplexity import measure_perplexity, read_text

    if fmt not in FORMATS:
        raise UserError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, not {fmt!r}")
    if method is None:
        # compressed-tensors: hqq on integer zero points scored about rtn's perplexity on SmolLM2 at 7x the time
        method = "rtn" if bits == 8 or fmt in ("compressed-tensors", "gptq") else "hqq"
    layout = fmt if fmt in ("compressed-tensors", "gptq") else "llmcli"
    spec = QuantSpec(bits, group_size, method, quantize_embeddings, format=layout)
    spec.validate()
    if fmt == "gguf":
        gguf_type = check_gguf_type(gguf_type, spec)
    elif gguf_type is not None:
        raise UserError("--gguf-type needs --format gguf")
    if method == "gptq" and calibration is None:
        raise UserError("--method gptq needs --calibration FILE (text to collect layer inputs from)")
    if calibration is not None and not calibration.is_file():
        raise UserError(f"calibration file {calibration} not found")
    if eval_file is not None and not eval_file.is_file():
        raise UserError(f"eval file {eval_file} not found")
    src = resolve_model_spec(model)
    # compressed-tensors/gptq: refuses what the format cannot hold (MoE) before calibration, and names the
    # default output after the one group size every layer gets
    group = resolve_source_spec(src, spec).group_size
    out = output or _output_dir(src, spec.bits, group, method, fmt, gguf_type or "")
    check_output(src, out, force=force)  # exists, is/holds/inside the source, cannot be written: before any work
    if fmt == "gguf":
        summary = write_gguf(src, out, spec, force=force, gguf_type=gguf_type)
    else:
        hessians = None
        if method == "gptq" or (method == "nf4" and calibration is not None):  # nf4: GPTQ code placement
            hessians = collect_hessians(src, read_text(calibration), spec)
        summary = quantize_checkpoint(src, out, spec, force=force, hessians=hessians)
    ppl = {}
    if eval_file is not None:
        text = read_text(eval_file)
        for key, p in (("before", src), ("after", out)):
            ppl[key] = measure_perplexity(p, text, 512, 4096, None, None).perplexity
    _render(summary, ppl, as_json)


def _render(s, ppl: dict, as_json: bool) -> None:
    ratio = s.bytes_after / s.bytes_before if s.bytes_before else float("nan")
    data = {
        "output": str(s.output),
        "bits": s.spec.bits,
        "method": s.spec.method,
        "format": s.spec.format,
        "layers_quantized": len(s.layers),
        "tensors_kept_16bit": s.kept,
        "group_sizes": {str(k): v for k, v in s.group_sizes().items()},
        "bytes_before_16bit": s.bytes_before,
        "bytes_after": s.bytes_after,
        "ratio": ratio,
        "seconds": round(s.seconds, 2),
        "notes": s.notes,
    }
    if ppl:
        data["perplexity"] = ppl
    if as_json:
        typer.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quantized -> {s.output}", show_header=False)
    t.add_row("method", f"{s.spec.method}, {s.spec.bits}-bit")
    t.add_row("layers quantized", str(len(s.layers)))
    if s.group_sizes():
        t.add_row("group sizes", ", ".join(f"{g}: {n} layers" for g, n in sorted(s.group_sizes().items())))
    t.add_row("kept 16-bit", f"{s.kept} tensors (embeddings, norms, head, routers)")
    t.add_row("size", f"{format_bytes(s.bytes_before)} (16-bit) -> {format_bytes(s.bytes_after)} ({ratio:.2f}x)")
    t.add_row("time", f"{s.seconds:.1f} s")
    if ppl:
        b, a = ppl["before"], ppl["after"]
        t.add_row("perplexity", f"{b:.3f} -> {a:.3f} ({(a / b - 1) * 100:+.1f}%)")
    for n in s.notes:
        t.add_row("note", n)
    Console().print(t)
