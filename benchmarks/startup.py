"""Start-up: `llm run` until its first streamed character, against `python -c "import torch"` on the same machine.

usage: python benchmarks/startup.py [--rounds 5] [--prompt "What is the capital of France?"] [--model MODEL]
                                    [--max-tokens 1] [--llm "llm"]
Rounds alternate: one `python -c "import torch"`, then one `llm run PROMPT --max-tokens 1 --temperature 0` (the
default model unless --model) with its stdout on a pipe. `llm run` is timed from its start to the first byte of the
reply on the pipe (the first streamed token: what a user waits for) and to its exit. Printed: best and median of
each over the rounds, the extra of `llm run` over importing torch (best against best, and the median of the
per-round differences), the CPU (model, cores, SIMD flags) and the load average before and after (other processes
on the cores slow every run down: compare rounds, not machines).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    """CPU model, logical cores and the SIMD flags torch's CPU kernels dispatch on (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in SIMD_FLAGS if f in flags] or ["(flags unknown)"]
    return f"{model}, {os.cpu_count()} logical cores; {' '.join(have)}"


def llm_command(llm: str | None) -> list[str]:
    """The `llm` console script next to this interpreter (what a user types), else `python -m llmcli`."""
    if llm:
        return llm.split()
    script = Path(sys.executable).with_name("llm")
    if script.exists():
        return [str(script)]
    found = shutil.which("llm")
    return [found] if found else [sys.executable, "-m", "llmcli"]


def time_import_torch() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def time_run(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds to the first byte on stdout, seconds to exit, the reply) of one `llm run`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)  # blocks until the first streamed character is written and flushed
    t_first = time.perf_counter() - t0
    rest, err = proc.communicate()
    t_exit = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    if not first:
        raise SystemExit(f"{' '.join(cmd)} printed nothing on stdout")
    return t_first, t_exit, (first + rest).decode(errors="replace").strip()


def summary(name: str, xs: list[float]) -> str:
    return f"{name:34s} best {min(xs) * 1000:7.0f} ms   median {statistics.median(xs) * 1000:7.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--model", default=None, help="a model `llm run` takes (default: the built-in one)")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--llm", default=None, help="the command to start (default: the `llm` beside this python)")
    args = ap.parse_args()

    cmd = llm_command(args.llm) + ["run"] + ([args.model] if args.model else []) + [args.prompt]
    cmd += ["--max-tokens", str(args.max_tokens), "--temperature", "0"]
    print(f"CPU: {cpu_line()}")
    print(f"python {sys.version.split()[0]}; command: {' '.join(cmd)}")
    load_before = os.getloadavg()[0]
    time_run(cmd)  # once untimed: the model file and the interpreter's files in the page cache, as for any rerun
    torch_s, first_s, exit_s = [], [], []
    for _ in range(args.rounds):
        torch_s.append(time_import_torch())
        f, e, reply = time_run(cmd)
        first_s.append(f)
        exit_s.append(e)
    print(f"reply: {reply!r}")
    print(summary('python -c "import torch"', torch_s))
    print(summary("llm run: first streamed character", first_s))
    print(summary("llm run: process exit", exit_s))
    extra = [f - t for f, t in zip(first_s, torch_s)]
    print(
        f"{'extra to the first character':34s} best-vs-best {(min(first_s) - min(torch_s)) * 1000:7.0f} ms   "
        f"median of rounds {statistics.median(extra) * 1000:7.0f} ms"
    )
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds")


if __name__ == "__main__":
    main()
