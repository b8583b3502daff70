"""Decode tok/s of our engine and llama.cpp on the same GGUF, side by side, plus a greedy-token agreement check.

usage: python benchmarks/llamacpp_decode.py [MODEL.gguf] [--tokens 64] [--prompt-len 16] [--rounds 3] [--threads N]
                                            [--llama-python PYTHON]

Both engines get the same random prompt token ids (no BOS added by either), batch 1, greedy with EOS ignored; the
first token (prefill) is timed apart and excluded from the decode rate. Rounds alternate between the engines and
the best round of each is kept (llmcli.tools.bench's method), so background load hits both alike. Both use the same
thread count (default: torch's). Afterwards both generate greedily from a few more prompts and the script prints
how many leading tokens agree: the kept Q4_1/Q8_0 weights go through different kernels (our int4 kernel rounds the
block scales/offsets to bf16, Q8_0 is requantized per row; llama.cpp quantizes activations to 8 bits) so a late
divergence is expected and only reported.

llama.cpp is not a dependency of the project. It runs in a subprocess, this same file started with `--worker` by
a Python that has the PyPI package llama-cpp-cffi (a prebuilt CPU build of llama.cpp); only its compiled CPU
module is loaded (not the package's __init__, which imports transformers). A separate process keeps torch's and
ggml's thread pools apart; each process times its own decode loop, and the requests go over stdin/stdout. The
Python is taken from --llama-python, else $LLAMA_CPP_PYTHON, else this interpreter, else /tmp/lcvenv/bin/python.
Setup (a side venv; `cffi` is needed but not declared by the package):

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install llama-cpp-cffi==0.4.42 cffi

Shim: the 0.4.42 CPU module was built with GCC 14 and needs `__cxa_call_terminate` (CXXABI 1.3.15), which an older
libstdc++ (GCC 12 on Debian 12) lacks, so importing it fails with "undefined symbol: __cxa_call_terminate". The
script then compiles a 5-line C stand-in (catch the exception, std::terminate: what libstdc++'s own does) with gcc
into $TMPDIR/llmcli-llamacpp-shim/ and starts the worker again with it in LD_PRELOAD. It is only reached when an
exception escapes a noexcept function, i.e. never in a normal run.

llama.cpp side: llama_model_load_from_file (mmap, CPU), a context with default parameters (F16 KV cache, no flash
attention) and n_threads = n_threads_batch = --threads, a ggml thread pool attached the way llama.cpp's own CLI
does it (the wheel is built without OpenMP; without a pool ggml would start threads on every decode call) and
paused between requests so its polling threads do not take CPU from our engine's rounds, a greedy sampler; each
round clears the KV cache, decodes the prompt in one llama_decode, then one token per llama_decode.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL = "python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install llama-cpp-cffi==0.4.42 cffi"
DEFAULT_SIDE_PYTHON = "/tmp/lcvenv/bin/python"
MISSING_SYMBOL = "__cxa_call_terminate"
SHIM_C = """\
extern void *__cxa_begin_catch(void *);
extern void _ZSt9terminatev(void) __attribute__((noreturn));
void __cxa_call_terminate(void *unwind_header) {
    if (unwind_header) __cxa_begin_catch(unwind_header);
    _ZSt9terminatev();
}
"""


# ---- the llama.cpp worker: runs under the side venv's Python, standard library + cffi only ------------------------


def _load_llama_cpu_module():
    """llama-cpp-cffi's compiled CPU module, without running the package's __init__ (transformers, GPU probes)."""
    import importlib.util

    spec = importlib.util.find_spec("llama")
    so = []
    if spec is not None and spec.submodule_search_locations:
        so = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_llama_cpp_cpu*.so"))
    if not so:
        raise ImportError("llama-cpp-cffi is not installed in this Python")
    mod_spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", so[0])
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def worker(model: str, threads: int, n_ctx: int) -> None:
    """Answer one JSON line per request {"prompt": [ids], "tokens": n} with timings and the greedy tokens."""

    def reply(**kw) -> None:
        print(json.dumps(kw), flush=True)

    try:
        mod = _load_llama_cpu_module()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides what to do
        reply(error=f"{type(e).__name__}: {e}", missing_symbol=MISSING_SYMBOL in str(e))
        return
    import importlib.metadata

    ffi, lib = mod.ffi, mod.lib

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def _quiet(level, text, user_data):  # llama.cpp's load log would interleave with the protocol's lines
        pass

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    llm = lib.llama_model_load_from_file(model.encode(), mparams)
    if llm == ffi.NULL:
        reply(error=f"llama.cpp could not load {model}")
        return
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = max(cparams.n_batch, n_ctx)  # the whole prompt in one llama_decode
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lib.llama_init_from_model(llm, cparams)
    if ctx == ffi.NULL:
        reply(error="llama.cpp could not create a context")
        return
    pool_params = lib.ggml_threadpool_params_default(threads)
    pool = lib.ggml_threadpool_new(ffi.new("struct ggml_threadpool_params *", pool_params))
    lib.llama_attach_threadpool(ctx, pool, pool)
    lib.ggml_threadpool_pause(pool)
    sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(sampler, lib.llama_sampler_init_greedy())
    vocab = lib.llama_model_get_vocab(llm)
    reply(
        ready=True,
        version=importlib.metadata.version("llama-cpp-cffi"),
        n_vocab=lib.llama_vocab_n_tokens(vocab),
        system_info=ffi.string(lib.llama_print_system_info()).decode().strip(" |"),
    )

    one = ffi.new("int32_t[1]")
    for line in sys.stdin:
        req = json.loads(line)
        prompt = ffi.new("int32_t[]", req["prompt"])
        n = req["tokens"]
        lib.llama_kv_self_clear(ctx)
        lib.llama_sampler_reset(sampler)
        lib.ggml_threadpool_resume(pool)
        t0 = time.perf_counter()
        rc = lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, len(req["prompt"])))
        out = [] if rc else [lib.llama_sampler_sample(sampler, ctx, -1)]  # no logits to sample after a failure
        t1 = time.perf_counter()
        while not rc and len(out) < n:
            one[0] = out[-1]
            rc = lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1))
            if not rc:
                out.append(lib.llama_sampler_sample(sampler, ctx, -1))
        t2 = time.perf_counter()
        lib.ggml_threadpool_pause(pool)
        if rc:
            reply(error=f"llama_decode returned {rc}")
        else:
            reply(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=out)


# ---- the driver: our engine in this process, llama.cpp in the worker ----------------------------------------------


class LlamaUnavailable(Exception):
    pass


def _build_shim() -> Path:
    """The __cxa_call_terminate stand-in (see the module docstring), compiled once per machine."""
    d = Path(tempfile.gettempdir()) / "llmcli-llamacpp-shim"
    lib = d / "libcxa_call_terminate.so"
    if lib.is_file():
        return lib
    d.mkdir(exist_ok=True)
    (d / "cxa_call_terminate.c").write_text(SHIM_C)
    try:
        r = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(d / "cxa_call_terminate.c"), "-lstdc++"],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise LlamaUnavailable(
            f"llama-cpp-cffi needs {MISSING_SYMBOL} (a newer libstdc++) and gcc is not installed to build the shim"
        ) from None
    if r.returncode:
        raise LlamaUnavailable(f"building the {MISSING_SYMBOL} shim failed: {r.stderr.strip()[-200:]}")
    return lib


@dataclass
class LlamaWorker:
    """A running worker process and what it reported at start."""

    proc: subprocess.Popen
    python: str
    version: str
    system_info: str
    n_vocab: int

    @classmethod
    def start(cls, python: str, model: Path, threads: int, n_ctx: int) -> LlamaWorker:
        env = dict(os.environ)
        for attempt in range(2):
            proc = subprocess.Popen(
                [python, __file__, "--worker", str(model), "--threads", str(threads), "--n-ctx", str(n_ctx)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            line = proc.stdout.readline()
            hello = json.loads(line) if line.strip() else {"error": "the worker exited without a word"}
            if hello.get("ready"):
                return cls(proc, python, hello["version"], hello["system_info"], hello["n_vocab"])
            proc.wait()
            if not (hello.get("missing_symbol") and attempt == 0):
                break
            shim = str(_build_shim())
            env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD"), shim]))
        shimmed = " (with the shim preloaded)" if attempt else ""
        raise LlamaUnavailable(f"llama.cpp worker ({python}){shimmed}: {hello['error']}; setup: {INSTALL}")

    def generate(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        """(prefill s, decode s, greedy token ids) as timed inside the worker."""
        self.proc.stdin.write(json.dumps({"prompt": prompt, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        r = json.loads(line) if line.strip() else {"error": "the llama.cpp worker died"}
        if "error" in r:
            raise LlamaUnavailable(r["error"])
        return r["prefill_s"], r["decode_s"], r["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _has_binding(python: str) -> bool:
    """Whether `python` can find llama-cpp-cffi (a spec lookup: nothing is imported)."""
    code = (
        "import glob, importlib.util, os, sys; s = importlib.util.find_spec('llama'); "
        "sys.exit(s is None or not s.submodule_search_locations or not glob.glob(os.path.join("
        "list(s.submodule_search_locations)[0], '_llama_cpp_cpu*.so')))"
    )
    try:
        return subprocess.run([python, "-c", code], capture_output=True).returncode == 0
    except OSError:
        return False


def find_side_python(explicit: str | None) -> str:
    if explicit:  # asked for by name: no fallback to another one
        if not _has_binding(explicit):
            raise LlamaUnavailable(f"{explicit} has no llama-cpp-cffi; install it with: {INSTALL}")
        return explicit
    candidates = [os.environ.get("LLAMA_CPP_PYTHON"), sys.executable, DEFAULT_SIDE_PYTHON]
    for py in filter(None, candidates):
        if _has_binding(py):
            return py
    raise LlamaUnavailable(
        f"llama.cpp not found (llama-cpp-cffi in --llama-python, $LLAMA_CPP_PYTHON, this "
        f"Python or {DEFAULT_SIDE_PYTHON}); install it with: {INSTALL}"
    )


def leading_matches(a: list[int], b: list[int]) -> int:
    """How many tokens agree before the first difference."""
    import torch

    n = min(len(a), len(b))
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0]) if len(diff) else n


def main() -> None:
    ap = argparse.ArgumentParser(description="Decode tok/s of llmcli and llama.cpp on the same GGUF, side by side.")
    ap.add_argument("model", nargs="?", help="a .gguf (default: the built-in SmolLM2 Q4_1)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per round (default 64)")
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds, the best kept (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    ap.add_argument("--check-prompts", type=int, default=3, help="prompts for the greedy-token check (default 3)")
    ap.add_argument(
        "--llama-python",
        default=None,
        help=f"a Python with llama-cpp-cffi installed (default: $LLAMA_CPP_PYTHON, this one, {DEFAULT_SIDE_PYTHON})",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=512, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.threads or 1, a.n_ctx)
        return
    if a.tokens < 2 or a.prompt_len < 1 or a.rounds < 1:
        sys.exit("error: --tokens must be at least 2, --prompt-len and --rounds at least 1")

    import torch

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.errors import UserError
    from llmcli.formats import is_gguf
    from llmcli.hub.resolve import resolve_model
    from llmcli.tools.bench import bench_engine, random_prompts

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    try:
        path = resolve_model(a.model)
        if not is_gguf(path):
            raise UserError(f"{path} is not a .gguf file: llama.cpp reads GGUF only")
        llama = LlamaWorker.start(find_side_python(a.llama_python), path, threads, a.prompt_len + a.tokens + 16)
    except (UserError, LlamaUnavailable) as e:
        sys.exit(f"error: {e}")
    try:
        engine = LLMEngine.load(path, device="cpu", tokenizer=False, kv_cache_gib=0.25)
        vocab = engine.config.vocab_size
        if llama.n_vocab != vocab:
            sys.exit(f"error: llama.cpp sees {llama.n_vocab} tokens, llmcli {vocab}")
        print(
            f"{path.name}, threads {threads}, batch 1, {a.prompt_len}-token prompt, {a.tokens} tokens, "
            f"best of {a.rounds} alternating rounds"
        )
        print(f"llama.cpp: llama-cpp-cffi {llama.version} via {llama.python} ({llama.system_info})")

        warm = random_prompts(vocab, 1, min(a.prompt_len, 16), 1)  # kernel packing, allocators, page faults
        bench_engine(engine, warm, 8)
        llama.generate(warm[0].tolist(), 8)
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for r in range(a.rounds):
            prompts = random_prompts(vocab, 1, a.prompt_len, 100 + r)  # new ids per round: no prefix-cache hits
            ours.append(bench_engine(engine, prompts, a.tokens))
            theirs.append(llama.generate(prompts[0].tolist(), a.tokens)[:2])

        rates = {}
        for name, runs in (("llmcli", ours), ("llama.cpp", theirs)):
            prefill, decode = min(p for p, _ in runs), min(d for _, d in runs)
            rates[name] = (a.tokens - 1) / decode
            print(f"  {name:<10} decode {rates[name]:7.1f} tok/s   prefill {a.prompt_len / prefill:8.1f} tok/s")
        print(f"  decode ratio llmcli / llama.cpp: {rates['llmcli'] / rates['llama.cpp']:.2f}x")

        params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
        matches = []
        for i in range(a.check_prompts):
            prompt = random_prompts(vocab, 1, a.prompt_len, 200 + i)[0].tolist()
            mine = engine.generate([prompt], params)[0]
            other = llama.generate(prompt, a.tokens)[2]
            k = leading_matches(mine, other)
            note = f" (then {mine[k]} vs {other[k]})" if k < a.tokens else ""
            matches.append(f"{k}/{a.tokens}{note}")
        if matches:
            print(f"  greedy tokens identical before the first difference, per prompt: {', '.join(matches)}")
    except (UserError, LlamaUnavailable) as e:
        sys.exit(f"error: {e}")
    finally:
        llama.close()


if __name__ == "__main__":
    main()
