"""Plain vs speculative decoding on SmolLM2-135M (CPU by default), side by side, on a repeat-a-passage prompt.

    .venv/bin/python benchmarks/speculative.py                        # n-gram drafting, K = 8 (adaptive)
    .venv/bin/python benchmarks/speculative.py --draft /tmp/smol-int4 # also a draft model (`llm quantize --bits 4`)
    .venv/bin/python benchmarks/speculative.py --threads 1 --json

Every row decodes the same greedy reply; "identical" checks it token for token against plain decoding.
"""

from __future__ import annotations

import argparse
import json

import torch

OPEN_PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target (default: the embedded SmolLM2-135M Q4_1 GGUF)")
    ap.add_argument("--draft", action="append", default=[], help="draft model(s) to compare (repeatable)")
    ap.add_argument("--num-draft", type=int, nargs="*", default=[4, 8], help="n-gram K values")
    ap.add_argument("--gen-len", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--open",
        action="store_true",
        help="also an open-ended prompt (little to copy): where adaptive K has to earn its keep",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llmcli.cli.options import make_decoder
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.speculative import SpeculativeDecoder
    from llmcli.engine.text import prompt_ids
    from llmcli.hub.resolve import resolve_model
    from llmcli.tools.bench import REPEAT_PROMPT, compare_speed

    target = LLMEngine.load(resolve_model(args.model), device=args.device)
    ids = prompt_ids(target.tokenizer, [{"role": "user", "content": REPEAT_PROMPT}])
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len)
    target.generate([ids], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up, and the prompt gets cached
    rows = []
    for k in args.num_draft:
        for adaptive in (False, True):
            dec = SpeculativeDecoder(target, None, method="ngram", num_draft=k, adaptive=adaptive)
            rows.append({"drafter": "ngram", "K": k, "adaptive": adaptive, **compare_speed(dec, ids, params).to_dict()})
    if args.open:
        open_ids = prompt_ids(target.tokenizer, [{"role": "user", "content": OPEN_PROMPT}])
        for k in args.num_draft:
            for adaptive in (False, True):
                dec = SpeculativeDecoder(target, None, method="ngram", num_draft=k, adaptive=adaptive)
                rows.append(
                    {
                        "drafter": "ngram (open prompt)",
                        "K": k,
                        "adaptive": adaptive,
                        **compare_speed(dec, open_ids, params).to_dict(),
                    }
                )
    for d in args.draft:
        dec = make_decoder(target, d, None, None, device=args.device)
        for k in (2, 4):
            dec.num_draft = k
            for adaptive in (False, True):
                dec.adaptive = adaptive
                rows.append({"drafter": d, "K": k, "adaptive": adaptive, **compare_speed(dec, ids, params).to_dict()})
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "prompt_tokens": len(ids), "rows": rows}, indent=1))
        return
    print(f"threads={torch.get_num_threads()} prompt={len(ids)} tokens, greedy, up to {args.gen_len} tokens")
    print(
        f"{'drafter':<22}{'K':>3}{'adapt':>6}{'plain tok/s':>13}{'spec tok/s':>12}{'speed-up':>10}"
        f"{'accept':>8}{'acc/step':>9}{'identical':>10}"
    )
    for r in rows:
        print(
            f"{str(r['drafter'])[-22:]:<22}{r['K']:>3}{str(r['adaptive']):>6}{r['plain_decode_tok_s']:>13.2f}"
            f"{r['speculative_decode_tok_s']:>12.2f}{r['speedup']:>9.2f}x{r['acceptance_rate']:>8.0%}"
            f"{r['mean_accepted']:>9.2f}{str(r['identical_output']):>10}"
        )


if __name__ == "__main__":
    main()
