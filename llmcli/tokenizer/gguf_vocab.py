"""GGUF vocabulary -> a `tokenizers` backend: llama.cpp's tokenizer.ggml.* metadata rebuilt as the Rust tokenizer.

gguf_bpe rebuilds byte-level BPE (gpt2 model, pre-tokenizer split by tokenizer.ggml.pre), gguf_spm
SentencePiece BPE (llama model; merges from the scores when the file has none), the way transformers
builds them from the same file so ids agree. llmcli.tokenizer wraps the result in a Tokenizer;
llmcli.quant.gguf_writer uses PRE_TOKENIZERS and gguf_bpe to name the pre-tokenizer it writes.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes for tokenizer.ggml.pre, as llama.cpp applies them before byte-level BPE.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"  # bloom: words with their leading space, punctuation apart
# falcon: three splits in turn, as llama.cpp applies them: punctuation runs, GPT-2's split, digits by threes
_FALCON = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"[0-9][0-9][0-9]",
)
# pre name -> (split regex (or several, applied in turn) or None for GPT-2's built-in one, split digits
# individually first, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str | tuple[str, ...] | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "gpt-2": (None, False, False),
    "phi-2": (None, False, False),
    "mpt": (None, False, False),
    "olmo": (None, False, False),
    "bloom": (_BLOOM, False, False),
    "poro-chat": (_BLOOM, False, False),
    "falcon": (_FALCON, False, False),
    "smollm": (None, True, False),
    "starcoder": (None, True, False),
    "refact": (None, True, False),
    "command-r": (None, True, False),
    "llama-bpe": (_LLAMA3, False, True),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
    "falcon3": (_LLAMA3, False, True),
    "smaug-bpe": (_LLAMA3, False, True),
    "dbrx": (_LLAMA3, False, False),
    "pixtral": (_LLAMA3, False, False),
    "qwen2": (_QWEN2, False, False),
    "deepseek-r1-qwen": (_QWEN2, False, False),
    "megrez": (_QWEN2, False, False),
    "gpt-4o": (_GPT4O, False, False),
    "llama4": (_GPT4O, False, False),
    "tekken": (_TEKKEN, False, False),
}
# Control tokens llama.cpp treats as end-of-generation even when the file names another eos.
EOG_TEXTS = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_text|>",
    "</s>",
    "<|return|>",
    "<|call|>",
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable latin-1 maps to itself)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def template_processor(bos: str | None, eos: str | None, backend: Backend) -> processors.TemplateProcessing:
    """The post-processor that adds BOS and/or EOS around encoded text, as llama.cpp's add_bos/add_eos do."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def gguf_bpe(meta: dict[str, Any]) -> Backend:
    """Byte-level BPE (GPT-2 style): vocab + merges from the file, pre-tokenizer from tokenizer.ggml.pre."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges_raw: list[str] = meta.get("tokenizer.ggml.merges") or []
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())

    def spell(t: str) -> str:
        # Real vocabulary entries are already in the byte alphabet; some converters store added tokens raw.
        # (issuperset walks the string: no set is built for each of the ~50k tokens on the start-up path)
        return t if spelled.issuperset(t) else "".join(alphabet[b] for b in t.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(spell(t), i)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's", pre)
    regex, digits, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])

    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=ignore_merges,
        )
    )
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        regexes = (regex,) if isinstance(regex, str) else regex
        steps += [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    # Control tokens are matched whole in text as special tokens, user-defined ones as plain added tokens.
    # A "control" token outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocab.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and spelled.issuperset(t)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == USER_DEFINED and t in vocab
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def gguf_spm(meta: dict[str, Any]) -> Backend:
    """SentencePiece BPE (llama/mistral/gemma/phi3 style): '▁' for spaces, <0xNN> byte-fallback tokens.

    Built the way transformers builds it from the same file (LlamaTokenizer; GemmaTokenizer and phi3's
    normalizer for those architectures) so ids agree. GGUF stores scores, not merges: every split (a, b)
    of a vocab entry into two vocab entries is a merge, ranked by that entry's score, best first.
    """
    arch = meta.get("general.architecture", "llama")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:  # gemma files store runs of spaces as real spaces; the model spells them with '▁'
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]  # gemma's merge order is file order, not its scores
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = meta.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_scores(tokens, scores, vocab)

    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if gemma:
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        backend = Backend(
            models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
        )
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        if arch == "phi3":  # phi3 prefixes '▁' with a normalizer (so after every special token too)
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
            )
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix or arch == "phi3":
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(dec)

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    special = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == CONTROL or i == unk_id
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    # Same ranking as transformers' generate_merges: by score (best first), then longer left and right
    # parts first; ties keep vocabulary order (the sort is stable).
    found = []
    seen = set()
    for t, s in zip(tokens, scores):
        if t in seen:
            continue
        seen.add(t)
        local = [(t[:k], t[k:], s) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]
