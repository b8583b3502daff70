"""Tokenizer, and load_tokenizer: the one loader, for HF tokenizer.json directories and GGUF metadata.

Tokenizer wraps a `tokenizers.Tokenizer` (the Rust library transformers itself uses) plus what the
engine needs around it: the special tokens, the full set of end-of-generation ids, and the chat
template. The GGUF vocabulary rebuild is llmcli.tokenizer.gguf_vocab, the incremental detokenizer
llmcli.tokenizer.stream, template rendering llmcli.tokenizer.chat_template.

    tok = load_tokenizer(model_dir)   # tokenizer.json + tokenizer_config.json (+ friends)
    tok = load_tokenizer(gguf_path)   # rebuilt from tokenizer.ggml.* metadata
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from llmcli.errors import UserError
from llmcli.formats import is_gguf
from llmcli.formats.gguf_reader import gguf_metadata
from llmcli.tokenizer.chat_template import pick_template, render_chat_template
from llmcli.tokenizer.gguf_vocab import CONTROL, EOG_TEXTS, NORMAL, gguf_bpe, gguf_spm, template_processor

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

    @property
    def id_limit(self) -> int:
        """One past the largest token id the tokenizer can produce: the base vocabulary's ids are 0..n-1, added
        tokens may sit anywhere past it (so not vocab_size, which counts them). Cheap: no vocabulary dict."""
        added = self.backend.get_added_tokens_decoder()
        return max(self.backend.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    def check_fits(self, model_vocab_size: int, source: str | Path) -> None:
        """UserError when the tokenizer can produce ids the model has no embedding for (ids >= its vocab_size):
        a tokenizer from another model, or added tokens the checkpoint never grew its embedding for."""
        if self.id_limit > model_vocab_size:
            raise UserError(
                f"the tokenizer of {source} has token ids up to {self.id_limit - 1:,} but the model's vocabulary "
                f"(vocab_size) has {model_vocab_size:,} entries: tokenizer and weights do not belong together"
            )

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
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text, rendered as transformers' apply_chat_template(tokenize=False) would.

        template: a template text, or the name of one of chat_templates (default: the model's).
        """
        source = self.chat_templates.get(template, template) if template else None
        if source is None and tools and "tool_use" in self.chat_templates:
            source = self.chat_templates["tool_use"]
        source = source or self.chat_template
        if source is None:
            raise UserError("this model has no chat template; use plain completion or pass a template")
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            documents=documents,
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # Templates write their own BOS ({{ bos_token }}), so like transformers we add no special tokens here.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a model directory or a .gguf file: the one tokenizer loader.

    vocab_size: the model's; a tokenizer producing ids past it is refused (Tokenizer.check_fits)."""
    p = Path(path)
    tok = _from_gguf(p) if is_gguf(p) else _from_dir(p)
    if vocab_size is not None:
        tok.check_fits(vocab_size, p)
    return tok


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
    missing = [
        AddedToken(t, special=True, normalized=False) for t in special.values() if backend.token_to_id(t) is None
    ]
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


def _post_processor_adds_bos(backend, bos: str | None) -> bool:
    if bos is None:
        return False
    bos_id = backend.token_to_id(bos)
    probe = backend.encode("a", add_special_tokens=True).ids
    return bool(probe) and probe[0] == bos_id


# ---- GGUF -----------------------------------------------------------------------------------------------


def _from_gguf(path: Path) -> Tokenizer:
    meta = gguf_metadata(path)  # the first shard's, for split files
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{path} has no tokenizer (tokenizer.ggml.model/tokens missing)")
    if kind == "gpt2":
        backend = gguf_bpe(meta)
    elif kind == "llama":
        backend = gguf_spm(meta)
    else:
        raise UserError(f"{path}: GGUF tokenizer type {kind!r} is not supported (gpt2 and llama are)")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {
        k: t
        for k, t in (
            ("bos_token", tok("bos_token_id")),
            ("eos_token", tok("eos_token_id")),
            ("unk_token", tok("unknown_token_id")),
            ("pad_token", tok("padding_token_id")),
        )
        if t is not None
    }
    # SentencePiece vocabularies add BOS unless told otherwise (llama.cpp's default, and transformers').
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = template_processor(
        special.get("bos_token") if add_bos else None, special.get("eos_token") if add_eos else None, backend
    )

    eos = {
        int(meta[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if meta.get(k) is not None
    }
    eos.update(i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in EOG_TEXTS)

    named = {
        k[len("tokenizer.chat_template.") :]: v
        for k, v in meta.items()
        if k.startswith("tokenizer.chat_template.") and isinstance(v, str)
    }
    return Tokenizer(backend, special, frozenset(eos), meta.get("tokenizer.chat_template"), named, add_bos)
