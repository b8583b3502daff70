"""Rendering Hugging Face chat templates (Jinja2) exactly as transformers' apply_chat_template does.

Templates come from model repos, i.e. untrusted input, so they run in Jinja's immutable sandbox. The
environment matches transformers': trim_blocks + lstrip_blocks, the loopcontrols extension, a `tojson`
that does not HTML-escape (and keeps non-ASCII), and the helpers templates call: raise_exception,
strftime_now. Special tokens (bos_token, eos_token, ...) are template variables.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmcli.errors import UserError


def _raise_exception(message: str):
    # A template rejecting its input (e.g. "System role not supported") is a user error, not a crash.
    raise UserError(f"chat template: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some templates;
    when rendering a prompt it is a no-op, but without the tag the template would not even parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile once per template text (templates are reused for every turn of a chat)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        msg = " ".join(str(e.message).split())
        raise UserError(f"chat template has a syntax error: {msg} (line {e.lineno})") from None


def render_chat_template(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with the template text `source`.

    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...}; explicit kwargs override them (as in
    transformers). Keys whose value is None are dropped from each message, because API clients send
    `content: None` and templates that test `'content' in message` would render "None".
    """
    if not messages:
        raise UserError("cannot apply a chat template to an empty conversation")
    for m in messages:
        if not isinstance(m, dict):
            raise UserError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
    messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
    template = compile_template(source)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except UserError:
        raise
    except jinja2.TemplateError as e:
        raise UserError(f"chat template failed: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        # The template's own code choked on these messages (e.g. tojson of a missing field).
        raise UserError(f"chat template failed on these messages: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Names clients use for a message's reasoning; templates read `reasoning_content` (Qwen3, DeepSeek) or
# `thinking` (gpt-oss), so like transformers we fill both from whichever is given.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(m: dict) -> dict:
    reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is None:
        return m
    return {"thinking": reasoning, **m, "reasoning_content": reasoning}


def pick_template(template: str | list | dict | None, name: str | None = None, tools: bool = False) -> str | None:
    """tokenizer_config.json may hold a list of named templates ([{"name": "default", "template": ...}, ...]).

    name picks one; else "tool_use" when tools are given and it exists; else "default".
    """
    if template is None or isinstance(template, str):
        return template
    named = {t["name"]: t["template"] for t in template} if isinstance(template, list) else dict(template)
    if name is not None:
        if name not in named:
            raise UserError(f"no chat template named {name!r}; available: {', '.join(named)}")
        return named[name]
    if tools and "tool_use" in named:
        return named["tool_use"]
    return named.get("default")
