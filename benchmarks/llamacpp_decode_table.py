"""The whole CPU decode table of issue 18 in one run: llmcli vs llama.cpp, threads x context x file, with CPU flags.

usage: python benchmarks/llamacpp_decode_table.py [--threads 1,2] [--contexts 128,2000] [--tokens 32] [--rounds 3]
                                                  [--q4 FILE.gguf] [--q8 FILE.gguf] [--llama-python PYTHON]

Files: the built-in SmolLM2 Q4_1 and a Q8_0 written by our own `llm quantize --format gguf --bits 8` from it (made
once into $TMPDIR/llmcli-bench/ when --q8 is not given). For every (file, threads) pair one llama.cpp worker
(benchmarks/llamacpp_decode.py's, same thread count) runs beside our engine; for each context both engines get the
same random prompt of that many tokens, then decode --tokens more, greedy, EOS ignored; prefill is timed apart.
Rounds alternate between the engines and the best of each is kept, so background load hits both alike. The CPU's
SIMD flags and torch's kernel capability are printed with the table: the kernels differ on AVX2-only machines.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llamacpp_decode import LlamaUnavailable, LlamaWorker, find_side_python

FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4_2")


def cpu_flags() -> str:
    """The SIMD flags in /proc/cpuinfo (Linux) and torch's detected capability, for the table's caption."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = {f for f in line.split(":", 1)[1].split() if f.startswith(FLAG_PREFIXES)}
                break
    except OSError:
        pass
    return f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}; flags: {' '.join(sorted(flags)) or '?'}"


def default_q8(q4: Path) -> Path:
    """A Q8_0 GGUF written by `llm quantize` from the Q4_1 file, made once and reused."""
    name = q4.name.replace("Q4_1", "Q8_0") if "Q4_1" in q4.name else f"{q4.stem}.Q8_0.gguf"
    out = Path(tempfile.gettempdir()) / "llmcli-bench" / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # the `llm` entry point of this interpreter (llmcli.cli:main), so no PATH lookup is needed
        code = "import sys; from llmcli.cli import main; sys.argv[0] = 'llm'; sys.exit(main())"
        cmd = [sys.executable, "-c", code, "quantize", str(q4), "--format", "gguf", "--bits", "8", "-o", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def run_pair(engine, llama: LlamaWorker, ctx: int, tokens: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{engine: (prefill tok/s, decode tok/s)}, best of `rounds` alternating rounds at a `ctx`-token prompt."""
    from llmcli.tools.bench import bench_engine, random_prompts

    vocab = engine.config.vocab_size
    warm = random_prompts(vocab, 1, 16, 1)
    bench_engine(engine, warm, 8)
    llama.generate(warm[0].tolist(), 8)
    ours, theirs = [], []
    for r in range(rounds):
        prompts = random_prompts(vocab, 1, ctx, 100 + r)  # new ids per round: no prefix-cache hits
        ours.append(bench_engine(engine, prompts, tokens))
        theirs.append(llama.generate(prompts[0].tolist(), tokens)[:2])
    return {
        name: (ctx / min(p for p, _ in runs), (tokens - 1) / min(d for _, d in runs))
        for name, runs in (("llmcli", ours), ("llama.cpp", theirs))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="llmcli vs llama.cpp CPU decode: threads x context x file.")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--contexts", default="128,2000", help="comma-separated prompt lengths (default 128,2000)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per round (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds, the best kept (default 3)")
    ap.add_argument("--q4", default=None, help="the Q4_1 GGUF (default: the built-in model)")
    ap.add_argument("--q8", default=None, help="a Q8_0 GGUF (default: `llm quantize --format gguf --bits 8` of --q4)")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-cffi (see llamacpp_decode.py)")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]

    import torch

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.errors import UserError
    from llmcli.hub.resolve import resolve_model

    try:
        q4 = resolve_model(a.q4)
        files = [q4, Path(a.q8) if a.q8 else default_q8(q4)]
        python = find_side_python(a.llama_python)
    except (UserError, LlamaUnavailable, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} logical CPUs")
    print(f"batch 1, {a.tokens} decoded tokens after the prompt, best of {a.rounds} alternating rounds; tok/s")
    print(
        f"{'file':<34} {'thr':>3} {'ctx':>5} | {'decode ours':>11} {'llama.cpp':>9} {'ratio':>6} | "
        f"{'prefill ours':>12} {'llama.cpp':>9}"
    )
    for path in files:
        engine = LLMEngine.load(path, device="cpu", tokenizer=False, kv_cache_gib=0.25)
        for t in threads:
            torch.set_num_threads(t)
            llama = LlamaWorker.start(python, path, t, max(contexts) + a.tokens + 16)
            try:
                for ctx in contexts:
                    r = run_pair(engine, llama, ctx, a.tokens, a.rounds)
                    (op, od), (lp, ld) = r["llmcli"], r["llama.cpp"]
                    print(
                        f"{path.name:<34} {t:>3} {ctx:>5} | {od:>11.1f} {ld:>9.1f} {od / ld:>5.2f}x | "
                        f"{op:>12.1f} {lp:>9.1f}",
                        flush=True,
                    )
            finally:
                llama.close()
        del engine


if __name__ == "__main__":
    main()
