"""Tokenizers for every model format we load: HF tokenizer.json directories and GGUF metadata.

Tokenizer wraps a `tokenizers.Tokenizer` (the Rust library transformers itself uses) plus what the
engine needs around it: the special tokens, the full set of end-of-generation ids, and the chat
template. StreamDecoder turns a stream of generated ids into text deltas.

    tok = load_tokenizer(model_dir)   # tokenizer.json + tokenizer_config.json (+ friends)
    tok = load_tokenizer(gguf_path)   # rebuilt from tokenizer.ggml.* metadata
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llmcli.tokenizer.chat_template import pick_template, render_chat_template
from llmcli.errors import UserError
from llmcli.formats import is_gguf

log = logging.getLogger(__name__)

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class Tokenizer:
    backend: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)  # {"bos_token": "<s>", ...}, only those set
    eos_token_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # named alternatives (e.g. "tool_use")
    add_bos_token: bool = False  # informational: whether encode(add_special_tokens=True) prepends BOS

    # ---- ids <-> text ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- special tokens -------------------------------------------------------------------------------
    def _special_id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self.special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            template: str | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text, rendered as transformers' apply_chat_template(tokenize=False) would.

        template: a template text, or the name of one of chat_templates (default: the model's).
        """
        source = self.chat_templates.get(template, template) if template else None
        if source is None and tools and "tool_use" in self.chat_templates:
            source = self.chat_templates["tool_use"]
        source = source or self.chat_template
        if source is None:
            raise UserError("this model has no chat template; use plain completion or pass a template")
        return render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, tools=tools, documents=documents, **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # Templates write their own BOS ({{ bos_token }}), so like transformers we add no special tokens here.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory or a .gguf file: the one tokenizer loader."""
    p = Path(path)
    return _from_gguf(p) if is_gguf(p) else _from_dir(p)


# ---- streaming ------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get the new text for each.

    Decoding ids one by one is wrong twice over: a character can span several byte-level tokens (emoji,
    CJK), and SentencePiece decoders drop the leading space of the first token they see. So, like
    vLLM's incremental detokenizer, we decode a window that starts a few tokens back and emit only what
    the new tokens added; while the text ends in U+FFFD (an incomplete UTF-8 sequence) we hold back.
    The concatenation of all deltas plus flush() equals decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few tokens of already-emitted context
        self.read = 0  # ids before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if new_text.endswith("\ufffd") or not new_text.startswith(prefix_text):
            # Mid-character (or the window does not yet extend the emitted text): wait for more tokens.
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Whatever is held back at the end (e.g. invalid UTF-8 that will never complete)."""
        if self.read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text
        self.prefix, self.read = self.read, len(self.ids)
        return delta


# ---- HF directories -----------------------------------------------------------------------------------


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_str(v: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedTokens ({"content": ...})."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _as_ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def _from_dir(d: Path) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"no tokenizer.json in {d} (sentencepiece-only tokenizers are not supported)")
    try:
        backend = Backend.from_file(str(tj))
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{tj} could not be loaded: {msg}") from None
    tc = _read_json(d / "tokenizer_config.json")
    stm = _read_json(d / "special_tokens_map.json")
    special = {}
    for key in SPECIAL_KEYS:
        tok = _token_str(tc.get(key)) or _token_str(stm.get(key))
        if tok is not None:
            special[key] = tok
    # Named special tokens missing from the vocabulary are added as special tokens (transformers does too).
    missing = [AddedToken(t, special=True, normalized=False) for t in special.values() if backend.token_to_id(t) is None]
    if missing:
        backend.add_tokens(missing)

    # tokenizer.json's post-processor alone decides whether encode() adds BOS/EOS: transformers v5 ignores
    # tokenizer_config's add_bos_token/add_eos_token when a tokenizer.json exists, and so do we.
    add_bos = _post_processor_adds_bos(backend, special.get("bos_token"))

    # Chat template: chat_template.jinja beats chat_template.json beats tokenizer_config.json.
    template: Any = tc.get("chat_template")
    if (d / "chat_template.json").is_file():
        template = _read_json(d / "chat_template.json").get("chat_template", template)
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    named = {}
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template if "name" in t and "template" in t}
    extra_dir = d / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            named.setdefault(f.stem, f.read_text(encoding="utf-8"))

    eos: set[int] = set()
    eos.update(_as_ids(_read_json(d / "generation_config.json").get("eos_token_id")))
    cfg = _read_json(d / "config.json")
    eos.update(_as_ids(cfg.get("eos_token_id") or (cfg.get("text_config") or {}).get("eos_token_id")))
    if special.get("eos_token") is not None and backend.token_to_id(special["eos_token"]) is not None:
        eos.add(backend.token_to_id(special["eos_token"]))
    return Tokenizer(backend, special, frozenset(eos), pick_template(template), named, add_bos)


def _template_processor(bos: str | None, eos: str | None, backend):
    from tokenizers import processors

    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _post_processor_adds_bos(backend, bos: str | None) -> bool:
    if bos is None:
        return False
    bos_id = backend.token_to_id(bos)
    probe = backend.encode("a", add_special_tokens=True).ids
    return bool(probe) and probe[0] == bos_id


# ---- GGUF -----------------------------------------------------------------------------------------------

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes for tokenizer.ggml.pre, as llama.cpp applies them before byte-level BPE.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (split regex or None for GPT-2's built-in one, split digits individually first, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False), "gpt2": (None, False, False), "gpt-2": (None, False, False),
    "smollm": (None, True, False), "starcoder": (None, True, False), "refact": (None, True, False),
    "command-r": (None, True, False),
    "llama-bpe": (_LLAMA3, False, True), "llama3": (_LLAMA3, False, True), "llama-v3": (_LLAMA3, False, True),
    "falcon3": (_LLAMA3, False, True), "smaug-bpe": (_LLAMA3, False, True), "dbrx": (_LLAMA3, False, False),
    "pixtral": (_LLAMA3, False, False),
    "qwen2": (_QWEN2, False, False), "deepseek-r1-qwen": (_QWEN2, False, False), "megrez": (_QWEN2, False, False),
    "gpt-4o": (_GPT4O, False, False), "llama4": (_GPT4O, False, False), "tekken": (_TEKKEN, False, False),
}
# Control tokens llama.cpp treats as end-of-generation even when the file names another eos.
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
              "<|END_OF_TURN_TOKEN|>", "<|end_of_text|>", "</s>", "<|return|>", "<|call|>"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable latin-1 maps to itself)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _gguf_fields(path: Path) -> dict[str, Any]:
    from llmcli.formats.gguf import gguf_metadata

    return gguf_metadata(path)  # the first shard's, for split files


def _from_gguf(path: Path) -> Tokenizer:
    meta = _gguf_fields(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{path} has no tokenizer (tokenizer.ggml.model/tokens missing)")
    if kind == "gpt2":
        backend = _gguf_bpe(meta)
    elif kind == "llama":
        backend = _gguf_spm(meta)
    else:
        raise UserError(f"{path}: GGUF tokenizer type {kind!r} is not supported (gpt2 and llama are)")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {k: t for k, t in (("bos_token", tok("bos_token_id")), ("eos_token", tok("eos_token_id")),
                                 ("unk_token", tok("unknown_token_id")), ("pad_token", tok("padding_token_id")))
               if t is not None}
    # SentencePiece vocabularies add BOS unless told otherwise (llama.cpp's default, and transformers').
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _template_processor(special.get("bos_token") if add_bos else None,
                                                 special.get("eos_token") if add_eos else None, backend)

    eos = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if meta.get(k) is not None}
    eos.update(i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in _EOG_TEXTS)

    named = {k[len("tokenizer.chat_template."):]: v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    return Tokenizer(backend, special, frozenset(eos), meta.get("tokenizer.chat_template"), named, add_bos)


def _gguf_bpe(meta: dict[str, Any]):
    """Byte-level BPE (GPT-2 style): vocab + merges from the file, pre-tokenizer from tokenizer.ggml.pre."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges_raw: list[str] = meta.get("tokenizer.ggml.merges") or []
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())

    def spell(t: str) -> str:
        # Real vocabulary entries are already in the byte alphabet; some converters store added tokens raw.
        return t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(spell(t), i)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's", pre)
    regex, digits, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])

    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    # Control tokens are matched whole in text as special tokens, user-defined ones as plain added tokens.
    # A "control" token outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocab.
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= spelled]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def _gguf_spm(meta: dict[str, Any]):
    """SentencePiece BPE (llama/mistral/gemma/phi3 style): '▁' for spaces, <0xNN> byte-fallback tokens.

    Built the way transformers builds it from the same file (LlamaTokenizer; GemmaTokenizer and phi3's
    normalizer for those architectures) so ids agree. GGUF stores scores, not merges: every split (a, b)
    of a vocab entry into two vocab entries is a merge, ranked by that entry's score, best first.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

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
        backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                     dropout=None))
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        if arch == "phi3":  # phi3 prefixes '▁' with a normalizer (so after every special token too)
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix or arch == "phi3":
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(dec)

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    special = [AddedToken(t, special=True, normalized=False)
               for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL or i == unk_id]
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
