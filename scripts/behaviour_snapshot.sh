#!/usr/bin/env bash
# Writes the outputs of a fixed set of `llm` commands into DIR, for a before/after comparison of a refactor:
#   bash scripts/behaviour_snapshot.sh /tmp/before   (on the old commit)
#   bash scripts/behaviour_snapshot.sh /tmp/after    (on the new one)
#   diff -r /tmp/before /tmp/after
# Timing lines (TTFT, tok/s, seconds) are the only thing filtered out; everything else must be byte-identical.
# It uses a private LLMCLI_HOME and HF_HOME, so the user's store is never touched.
set -uo pipefail
OUT=${1:?usage: behaviour_snapshot.sh DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LLM=${LLM:-$ROOT/.venv/bin/llm}
PY=${PY:-$ROOT/.venv/bin/python}
GGUF=$("$PY" -m llmcli.hub.default_model 2>/dev/null || "$PY" -m llmcli.default_model)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export LLMCLI_HOME=$WORK/home HF_HOME=$WORK/hf LLMCLI_DEFAULT_MODEL=$GGUF HF_HUB_OFFLINE=1 COLUMNS=120 NO_COLOR=1
export TERM=dumb PYTHONHASHSEED=0 TRANSFORMERS_VERBOSITY=error

# Tiny random models, one per family, built by transformers from a fixed seed.
(cd "$ROOT/tests" && "$PY" - "$WORK/tiny" <<'EOF'
import sys
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from conftest import TINY_CONFIGS, build_tiny_model
alphabet = pre_tokenizers.ByteLevel.alphabet()  # a byte-level BPE with no merges: the tiny models' 256 ids
tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
for family in TINY_CONFIGS:
    build_tiny_model(family, Path(sys.argv[1]) / family)
    tok.save(str(Path(sys.argv[1]) / family / "tokenizer.json"))
EOF
) >/dev/null 2>&1

untime() { sed -E -e 's/[0-9.]+ ?(ms|s|tok\/s)\b/T\1/g' -e 's/"(ttft|elapsed|time|seconds|prefill_tok_s|decode_tok_s|tok_s|[a-z_]*_s|[a-z_]*_ms)": [0-9.e+-]+/"\1": T/g' \
               -e 's/(modified|mtime)": [0-9.]+/\1": T/g' -e "s#$WORK#WORK#g" \
               -e 's/[0-9]+ (second|minute|hour|day)s? ago/N ago/' -e 's/~[0-9.]+x/~Tx/' -e 's/"speedup_est": [0-9.]+/"speedup_est": T/'; }
run() {  # run NAME CMD...: stdout, stderr (timings masked) and exit code
  local name=$1; shift
  "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" </dev/null
  echo $? >"$OUT/$name.rc"
  for f in "$OUT/$name.out" "$OUT/$name.err"; do untime <"$f" >"$f.tmp" && mv "$f.tmp" "$f"; done
}
hashes() { (cd "$1" && find . -type f ! -name '*.json' -print0 | sort -z | xargs -0 sha256sum; \
            find . -type f -name '*.json' -print0 | sort -z | xargs -0 -I{} sh -c 'echo "== {}"; cat "{}"'); }

run run_default "$LLM" run "What is the capital of France?" --temperature 0
run run_default_json "$LLM" run "Name a colour." --temperature 0 --max-tokens 12 --json
run run_seeded "$LLM" run "Tell me a story." --seed 7 --max-tokens 24
run run_ngram "$LLM" run "Repeat: one two three one two three one two" --temperature 0 --max-tokens 16 --speculate ngram
for fam in llama qwen3_moe deepseek_v3 gemma3 mixtral; do
  run "run_tiny_$fam" "$LLM" run "$WORK/tiny/$fam" "hello world" --raw --temperature 0 --max-tokens 8 --ignore-eos
done
for fam in $(ls "$WORK/tiny"); do
  run "estimate_$fam" "$LLM" estimate "$WORK/tiny/$fam" --json
done
run estimate_default "$LLM" estimate --gpu RTX-4090
run estimate_default_json "$LLM" estimate --json --dtype int4 --context 2048 --batch 4
run estimate_explain "$LLM" estimate --explain
run show_default_json "$LLM" show --json
run show_tiny "$LLM" show "$WORK/tiny/llama" --json

"$LLM" quantize "$WORK/tiny/llama" --bits 8 -o "$WORK/q/int8" >"$OUT/quant_int8.out" 2>&1; echo $? >>"$OUT/quant_int8.out"
"$LLM" quantize "$WORK/tiny/llama" --bits 4 --group-size 32 -o "$WORK/q/int4" >"$OUT/quant_int4.out" 2>&1
"$LLM" quantize "$WORK/tiny/qwen3_moe" --bits 4 --group-size 32 --method rtn -o "$WORK/q/moe4" >"$OUT/quant_moe4.out" 2>&1
"$LLM" quantize "$WORK/tiny/llama" --method nf4 -o "$WORK/q/nf4" >"$OUT/quant_nf4.out" 2>&1
printf 'the quick brown fox jumps over the lazy dog %.0s' $(seq 40) >"$WORK/calib.txt"
"$LLM" quantize "$WORK/tiny/llama" --bits 4 --group-size 32 --method gptq --calibration "$WORK/calib.txt" \
  -o "$WORK/q/gptq" >"$OUT/quant_gptq.out" 2>&1
"$LLM" quantize --bits 8 --format gguf -o "$WORK/q/default.q8.gguf" >"$OUT/quant_gguf.out" 2>&1
"$LLM" quantize "$WORK/tiny/qwen3" --bits 4 --format gguf -o "$WORK/q/qwen3.q4.gguf" >"$OUT/quant_gguf2.out" 2>&1
for f in "$OUT"/quant_*.out; do untime <"$f" >"$f.tmp" && mv "$f.tmp" "$f"; done
hashes "$WORK/q" >"$OUT/quant_hashes.txt"
run run_int4 "$LLM" run "$WORK/q/int4" "hello" --raw --temperature 0 --max-tokens 8 --ignore-eos
run ppl_tiny "$LLM" perplexity "$WORK/tiny/llama" --file "$WORK/calib.txt" --json
run ppl_default "$LLM" perplexity --max-tokens 256 --json
run list_json "$LLM" list --json
run list "$LLM" list
printf 'hello\n/show\n/set temperature 0\nWhat is 2+2?\n/bye\n' | "$LLM" chat --temperature 0 >"$OUT/chat.out" 2>"$OUT/chat.err"
for f in "$OUT/chat.out" "$OUT/chat.err"; do untime <"$f" >"$f.tmp" && mv "$f.tmp" "$f"; done
for cmd in "" run chat pull list show rm estimate quantize perplexity bench; do
  run "help_${cmd:-root}" "$LLM" $cmd --help
done
run err_missing "$LLM" run /nonexistent/model "hi"
run err_family "$LLM" estimate "$WORK/tiny/llama/model.safetensors"
run err_rm "$LLM" rm nosuchmodel
echo "snapshot written to $OUT ($(ls "$OUT" | wc -l) files)"
