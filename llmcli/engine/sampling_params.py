"""SamplingParams: how one reply is sampled, and how its values are validated and settled.

The one sampling type of `llm run`, `llm chat`, speculative decoding and the engine. Its field defaults are
neutral (every filter off, temperature 1); what a command starts from is `SamplingParams.settle`: llama.cpp's
defaults, then the model directory's generation_config.json, then the flags that were given.

The chat's user-facing names (`/set`, `/show`, the "settings" of a saved chat) are SETTING_NAMES; they match the
fields except `repeat_penalty`, the field `repetition_penalty`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# llama.cpp / Ollama defaults, used unless the model's generation_config.json or a flag says otherwise.
LLAMA_CPP_DEFAULTS: dict[str, float] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repetition_penalty": 1.0,
}


# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] (negatives wrap around); we take the unsigned half, which
# covers every generator state, and keep -1 for "random" as llama.cpp does (parse_setting).
MAX_SEED = 2**64 - 1


class SettingError(ValueError):
    """An unknown setting name or a value it cannot take (the message says which values are valid)."""


@dataclass
class SamplingParams:
    """temperature 0 = greedy. top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI's additive penalties over the tokens generated so far (0 = off): the logit of a token generated c
    # times drops by c * frequency_penalty + (c > 0) * presence_penalty. Server-only, so not chat settings.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        """The rules of parse_setting (what `llm run`'s flags and chat's /set accept), so no other value gets in."""
        for name in SETTING_NAMES:
            value = self.setting(name)
            if name == "max_tokens":
                ok, expected = value >= 0, "an integer >= 0"  # 0: prompt only (perplexity, the engine's own use)
            elif name == "seed" and value is None:
                continue
            else:
                _, rule, expected = _RULES[name]
                ok = (not isinstance(value, float) or math.isfinite(value)) and rule(value)
            if not ok:
                raise SettingError(f"invalid value for {name}: {value!r} (expected {expected})")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise SettingError(f"invalid value for {name}: {value!r} (expected a number in [-2, 2], 0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def settle(cls, model_path: Path | None, *, default_max_tokens: int, **flags: Any) -> SamplingParams:
        """llama.cpp's defaults, then the model directory's generation_config.json, then the flags that were given
        (field names; None = not given): how `llm run` and `llm chat` both settle their sampling."""
        params = cls(**{**LLAMA_CPP_DEFAULTS, **generation_defaults(model_path)}, max_tokens=default_max_tokens)
        return replace(params, **{name: value for name, value in flags.items() if value is not None})

    def with_setting(self, name: str, text: str) -> SamplingParams:
        """A copy with one setting (a user-facing name from SETTING_NAMES) parsed from text and validated."""
        if name not in _RULES:
            raise SettingError(f"unknown setting {name!r} (one of: {', '.join(_RULES)})")
        return replace(self, **{_FIELD.get(name, name): parse_setting(name, text)})

    def setting(self, name: str) -> Any:
        """The value of a user-facing setting."""
        return getattr(self, _FIELD.get(name, name))

    def settings(self) -> dict[str, Any]:
        """The user-facing settings, in SETTING_NAMES order (what /show lists and /save writes)."""
        return {name: self.setting(name) for name in SETTING_NAMES}


# user-facing name -> (type, valid?, what a valid value looks like)
_RULES: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repeat_penalty": (float, lambda v: v > 0, "a number > 0 (1 = off)"),
    "seed": (int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}, or -1 or 'none' for random"),
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
}
SETTING_NAMES = tuple(_RULES)
_FIELD = {"repeat_penalty": "repetition_penalty"}  # user-facing name -> field name, where they differ


def expected_value(name: str) -> str:
    """What a valid value of a user-facing setting looks like, e.g. "a number in (0, 1] (1 = off)"."""
    return _RULES[name][2]


def parse_setting(name: str, text: str) -> Any:
    """A user-facing setting's value from text; SettingError when it is not one the setting can take."""
    kind, ok, expected = _RULES[name]
    if name == "seed" and text.strip().lower() in ("none", "random", "-1"):
        return None
    try:
        value = kind(text.strip())
    except ValueError:
        raise SettingError(f"invalid value for {name}: {text.strip()!r} (expected {expected})") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise SettingError(f"invalid value for {name}: {text.strip()!r} (expected {expected})")
    return value


def generation_defaults(model_path: Path | None) -> dict[str, Any]:
    """Sampling fields from a model directory's generation_config.json (only the keys it sets, validated)."""
    if model_path is None or not Path(model_path).is_dir():
        return {}
    f = Path(model_path) / "generation_config.json"
    try:
        gc = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty"):
        field_name = _FIELD.get(name, name)  # generation_config.json spells the fields as we do
        if gc.get(field_name) is not None:
            try:
                out[field_name] = parse_setting(name, str(gc[field_name]))
            except SettingError:
                pass  # a value we cannot use: keep ours
    return out
