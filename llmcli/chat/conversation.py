"""The conversation of a chat: its messages, fitting them into the context, and saving / loading it as JSON."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.engine.sampling_params import SETTING_NAMES, SamplingParams, SettingError
from llmcli.engine.text import valid_text

DEFAULT_MAX_TOKENS = 2048  # a reply's budget in `llm chat` unless --max-tokens or /set max_tokens says otherwise
SAVE_FORMAT = "llmcli-chat"

# When a chat outgrows its context, the oldest turns go down to this fraction of the context, not just the few
# that make the next reply fit. Each turn's prompt is the whole conversation, and the KV cache reuses it up to the
# first token that changed: dropping turns changes the prompt right after the system prompt, so the turn after a
# drop re-processes everything kept. Dropping the minimum moves that point every turn (re-processing the whole
# history each turn, ~the full context); dropping down to half means one re-processing of at most half the context,
# then about half a context of conversation (many turns) that reuses its prefix before the next drop: roughly one
# extra prefill token per new token, while the model still sees at least half a context of history. llama.cpp's
# context shift discards half for the same reason.
KEEP_AFTER_DROP = 0.5


class CommandError(Exception):
    """A bad slash command or value: reported on one line, the chat goes on."""


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # {"role": "user"|"assistant", "content": str}

    def for_template(self, messages: list[dict] | None = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + (self.messages if messages is None else messages)


def default_settings() -> SamplingParams:
    """The chat's settings when nothing sets them: llama.cpp's defaults and a DEFAULT_MAX_TOKENS reply."""
    return SamplingParams.settle(None, default_max_tokens=DEFAULT_MAX_TOKENS)


def settings_from_dict(saved: dict[str, Any]) -> SamplingParams:
    """The settings of a saved chat: the chat's defaults, then each known setting it holds (validated)."""
    settings = default_settings()
    for name, value in saved.items():
        if name in SETTING_NAMES:
            try:
                settings = settings.with_setting(name, "none" if value is None else str(value))
            except SettingError as e:
                raise CommandError(str(e)) from None
    return settings


def save_conversation(path: Path, conv: Conversation, settings: SamplingParams, model: str) -> None:
    """JSON, written to a temporary file then renamed so a crash never leaves half a file."""
    data = {
        "format": SAVE_FORMAT,
        "version": 1,
        "model": model,
        "system": conv.system,
        "settings": settings.settings(),
        "messages": conv.messages,
    }
    path = Path(path).expanduser()
    if not path.name or path.is_dir():
        raise CommandError(f"cannot save to {path}: it is a directory (give a file name)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # ValueError: a path no system accepts (a NUL byte in it)
        with contextlib.suppress(OSError, ValueError):
            tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot save to {path}: {getattr(e, 'strerror', None) or e}") from None


def load_conversation(path: Path) -> tuple[Conversation, SamplingParams | None]:
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a path no system accepts (a NUL byte in it)
        raise CommandError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        raise CommandError(f"{path} is not a saved chat: not UTF-8 text ({bad})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CommandError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise CommandError(f"{path} is not a saved chat (no 'messages' list)")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise CommandError(f"{path}: message {i} needs a role (user or assistant) and a text content")
        messages.append(
            {"role": m["role"], "content": valid_text(m["content"])}
        )  # a JSON escape may be a lone surrogate
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise CommandError(f"{path}: 'system' must be text")
    settings = settings_from_dict(data["settings"]) if isinstance(data.get("settings"), dict) else None
    return Conversation(valid_text(system) if system else None, messages), settings


def fit_context(
    conv: Conversation, count_tokens: Callable[[list[dict]], int], budget: int, target: int | None = None
) -> int:
    """When the prompt is over `budget`, drop the oldest turns (never the system prompt, never the newest message)
    until it fits `target` (at most budget; default budget: the least that fits).

    Whole turns go together: after dropping, the conversation starts again at a user message. Returns how many
    messages were dropped (conv.messages is edited in place).
    """
    if count_tokens(conv.for_template()) <= budget:
        return 0
    target = budget if target is None else min(target, budget)
    dropped = 0
    while len(conv.messages) > 1 and count_tokens(conv.for_template()) > target:
        conv.messages.pop(0)
        dropped += 1
        while len(conv.messages) > 1 and conv.messages[0]["role"] != "user":
            conv.messages.pop(0)
            dropped += 1
    return dropped
