"""Ollama's native API: /api/chat and /api/generate requests -> Job, their NDJSON lines, and the model listings
(/api/tags, /api/show, /api/ps).

As Ollama does: streaming is on unless "stream": false; the last object has done true, done_reason, the token
counts and durations in nanoseconds; options carry the sampling (num_predict -1 = no limit, num_ctx caps prompt
and reply together).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmcli import __version__
from llmcli.engine.text import prompt_ids, text_ids
from llmcli.serve.errors import APIError
from llmcli.serve.generation import Generation, Job, settle_params
from llmcli.serve.model import ServedModel


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Loose):
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context's end; -2 the same (fill the context)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: list[str] | None = None
    num_ctx: int | None = Field(None, ge=1)


class ChatMessage(_Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""


class _Request(_Loose):
    model: str
    stream: bool = True
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)


class GenerateRequest(_Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class ShowRequest(_Loose):
    model: str | None = None
    name: str | None = None  # older clients' spelling


def _job(req: _Request, model: ServedModel, ids: list[int], prompt_param: str) -> Job:
    o = req.options
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    if o.num_ctx is not None:  # the context this request may use: the reply stops where it is full
        max_tokens = min(max_tokens or o.num_ctx, max(1, o.num_ctx - len(ids)))
    params = settle_params(
        model,
        max_tokens,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        min_p=o.min_p,
        repetition_penalty=o.repeat_penalty,
        seed=None if o.seed is None or o.seed < 0 else o.seed,
        frequency_penalty=o.frequency_penalty,
        presence_penalty=o.presence_penalty,
    )
    constraint = None
    if req.format == "json":
        constraint = model.grammars.json_factory(None, "format")
    elif isinstance(req.format, dict):
        constraint = model.grammars.json_factory(req.format, "format")
    return Job(ids, params, stops=list(o.stop or []), constraint=constraint, prompt_param=prompt_param)


def chat_job(req: ChatRequest, model: ServedModel) -> Job:
    llm, _ = model.require()
    if not req.messages:
        raise APIError(400, "messages is empty", param="messages")
    ids = prompt_ids(llm.tokenizer, [{"role": m.role, "content": m.content} for m in req.messages])
    return _job(req, model, ids, "messages")


def generate_job(req: GenerateRequest, model: ServedModel) -> Job:
    llm, _ = model.require()
    if req.raw:
        ids = text_ids(llm.tokenizer, req.prompt)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}
        ]
        ids = prompt_ids(llm.tokenizer, messages)
    return _job(req, model, ids, "prompt")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Reply:
    """One request's Ollama objects: NDJSON lines (lines) or the single object (collect)."""

    def __init__(self, gen: Generation, model_name: str, chat: bool):
        self.gen, self.model_name, self.chat = gen, model_name, chat

    def _body(self, text: str, done: bool) -> dict:
        body: dict = {"model": self.model_name, "created_at": _now()}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = done
        return body

    def _final(self, text: str, reason: str) -> dict:
        g = self.gen
        end = g.end_t or time.perf_counter()
        first = g.first_t or end
        body = self._body(text, True)
        body.update(
            done_reason=reason,
            total_duration=int((end - g.arrived) * 1e9),
            load_duration=0,  # the model stays loaded: nothing is loaded per request
            prompt_eval_count=g.prompt_tokens,
            prompt_eval_duration=int((first - g.arrived) * 1e9),
            eval_count=g.completion_tokens,
            eval_duration=int((end - first) * 1e9),
        )
        return body

    async def lines(self) -> AsyncIterator[str]:
        reason = "stop"
        async for d in self.gen.deltas():
            if d.text:
                yield json.dumps(self._body(d.text, False)) + "\n"
            reason = d.finish_reason or reason
        yield json.dumps(self._final("", reason)) + "\n"

    async def collect(self) -> dict:
        text, reason = "", "stop"
        async for d in self.gen.deltas():
            text += d.text
            reason = d.finish_reason or reason
        return self._final(text, reason)


def details(info: dict) -> dict:
    params = info.get("parameters")
    return {
        "parent_model": "",
        "format": "gguf" if info["format"].startswith("GGUF") else "safetensors",
        "family": info["architecture"],
        "families": [info["architecture"]],
        "parameter_size": f"{params / 1e6:.0f}M" if params and params < 1e9 else f"{(params or 0) / 1e9:.1f}B",
        "quantization_level": (info.get("quantization") or "").removeprefix("GGUF ") or "F32",
    }


def tag(model: ServedModel, info: dict) -> dict:
    modified = datetime.fromtimestamp(model.path.stat().st_mtime, timezone.utc).isoformat()
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": modified,
        "size": info["size"],
        "digest": "",
        "details": details(info),
    }


def show(model: ServedModel, info: dict) -> dict:
    llm = model.llm
    template = llm.tokenizer.chat_template if llm is not None and llm.tokenizer is not None else ""
    return {
        "modelfile": f"FROM {model.path}\n",
        "parameters": "",
        "template": template or "",
        "details": details(info),
        "model_info": {
            "general.architecture": info["architecture"],
            "general.parameter_count": info.get("parameters"),
            f"{info['architecture']}.context_length": info["context_length"],
            f"{info['architecture']}.embedding_length": info["hidden_size"],
            f"{info['architecture']}.block_count": info["layers"],
        },
        "capabilities": ["completion"],
    }


def ps(model: ServedModel, info: dict) -> dict:
    if not model.ready:
        return {"models": []}
    cuda = model.llm.device.type == "cuda"
    entry = {**tag(model, info), "expires_at": "9999-12-31T23:59:59Z", "size_vram": info["size"] if cuda else 0}
    entry.pop("modified_at")
    return {"models": [entry]}


def version() -> dict:
    return {"version": __version__}
