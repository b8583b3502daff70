"""OpenAI's API: request models, request -> Job, and the response bodies and SSE chunks built from Deltas.

Unknown request fields are accepted and ignored (clients send many); values out of range are refused (400) by the
models' constraints. Streaming follows what api.openai.com sends: per choice a role chunk, content chunks, a chunk
with finish_reason; with stream_options.include_usage every chunk has "usage": null and a last chunk with empty
choices carries it; then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmcli.engine.async_engine import TokenEvent
from llmcli.engine.text import prompt_ids, text_ids
from llmcli.serve.errors import APIError
from llmcli.serve.generation import Generation, Generations, Job, settle_params
from llmcli.serve.model import ServedModel
from llmcli.tokenizer import Tokenizer

MAX_STOPS = 4  # OpenAI's limit on stop strings


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ContentPart(_Loose):
    type: str
    text: str | None = None


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class JsonSchema(_Loose):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class _Sampling(_Loose):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int | None = Field(None, ge=-1)  # extra fields as vLLM and llama.cpp's server take them; -1 = off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False  # vLLM's extra field: generate to max_tokens (benchmarks)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
        return stops

    def sampling(self, model: ServedModel, max_tokens: int | None):
        return settle_params(
            model,
            max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=None if self.top_k is None else max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            ignore_eos=self.ignore_eos or None,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # one prompt, or several: a choice (n) each
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def _text(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"messages[{i}]: only text content parts are supported, not {part.type!r}",
                param=f"messages[{i}].content",
            )
        parts.append(part.text)
    return "".join(parts)


def chat_job(req: ChatRequest, model: ServedModel) -> Job:
    llm, _ = model.require()
    role = {"developer": "system"}
    messages = [{"role": role.get(m.role, m.role), "content": _text(m, i)} for i, m in enumerate(req.messages)]
    constraint = None
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        constraint = model.grammars.json_factory(None, "response_format")
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        constraint = model.grammars.json_factory(fmt.json_schema.schema_, "response_format.json_schema.schema")
    max_tokens = req.max_completion_tokens or req.max_tokens
    return Job(
        prompt_ids(llm.tokenizer, messages),
        req.sampling(model, max_tokens),
        n=req.n,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stops=req.stops(),
        constraint=constraint,
    )


def completion_jobs(req: CompletionRequest, model: ServedModel) -> list[Job]:
    """A Job per prompt (text or token ids), sharing the request's sampling. 400 for an empty prompt or list, a
    token id outside the vocabulary, or more prompts than the server queues (they could never all run)."""
    llm, _ = model.require()
    prompts = req.prompts()
    most = model.limits.max_num_seqs + model.limits.max_queue
    if not prompts or len(prompts) > most:
        raise APIError(400, f"prompt takes 1 to {most} prompts on this server, got {len(prompts)}", param="prompt")
    params, stops, jobs = req.sampling(model, req.max_tokens), req.stops(), []
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        ids = text_ids(llm.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{where} is empty", param=where)
        try:
            llm.check_ids(ids)
        except Exception as e:  # a token id outside the vocabulary (UserError)
            raise APIError(400, f"{where}: {e}", param=where) from None
        jobs.append(Job(ids, params, n=req.n, logprobs=req.logprobs, stops=stops, prompt_param=where))
    return jobs


# ---- responses -------------------------------------------------------------------------------------------


def usage(gen: Generation | Generations) -> dict:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


def _token(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    text = tok.decode([token_id])
    return text, list(text.encode("utf-8", errors="replace"))


def chat_logprobs(tok: Tokenizer, events: list[TokenEvent]) -> list[dict]:
    """choices[].logprobs.content entries for the tokens of one delta."""
    out = []
    for ev in events:
        text, raw = _token(tok, ev.token_id)
        top = []
        for tid, lp in ev.top_logprobs:
            t, b = _token(tok, tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top})
    return out


class CompletionLogprobs:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset) of a choice."""

    def __init__(self):
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, tok: Tokenizer, events: list[TokenEvent]) -> dict:
        start = len(self.tokens)
        for ev in events:
            text, _ = _token(tok, ev.token_id)
            self.tokens.append(text)
            self.token_logprobs.append(ev.logprob)
            self.top_logprobs.append({_token(tok, t)[0]: lp for t, lp in ev.top_logprobs})
            self.text_offset.append(self.offset)
            self.offset += len(text)
        return self.as_dict(start)

    def as_dict(self, start: int = 0) -> dict:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


class Reply:
    """Builds one request's OpenAI responses: whole (collect) or as SSE lines (sse)."""

    def __init__(self, gen: Generation | Generations, model_name: str, chat: bool, include_usage: bool = False):
        self.gen, self.model_name, self.chat, self.include_usage = gen, model_name, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.want_logprobs = gen.job.logprobs is not None
        self.tok = gen.tokenizer

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }

    async def collect(self) -> dict:
        n = self.gen.num_choices
        texts, finish = [""] * n, ["stop"] * n
        chat_lp: list[list[dict]] = [[] for _ in range(n)]
        comp_lp = [CompletionLogprobs() for _ in range(n)]
        async for d in self.gen.deltas():
            texts[d.index] += d.text
            finish[d.index] = d.finish_reason or finish[d.index]
            if self.want_logprobs:
                chat_lp[d.index] += chat_logprobs(self.tok, d.events) if self.chat else []
                if not self.chat:
                    comp_lp[d.index].add(self.tok, d.events)
        choices = []
        for i in range(n):
            if self.chat:
                lp = {"content": chat_lp[i], "refusal": None} if self.want_logprobs else None
                message = {"role": "assistant", "content": texts[i], "refusal": None}
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish[i]})
            else:
                lp = comp_lp[i].as_dict() if self.want_logprobs else None
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
        body = self._envelope(self.object, choices)
        body["usage"] = usage(self.gen)
        return body

    def _chunk(self, choices: list[dict]) -> str:
        body = self._envelope(self.object + ".chunk" if self.chat else self.object, choices)
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def _choice(self, index: int, text: str, logprobs: Any, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta: dict = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    async def sse(self) -> AsyncIterator[str]:
        comp_lp = [CompletionLogprobs() for _ in range(self.gen.num_choices)]
        if self.chat:
            yield self._chunk([self._choice(i, "", None, None, role=True) for i in range(self.gen.num_choices)])
        async for d in self.gen.deltas():
            lp = None
            if self.want_logprobs:
                lp = {"content": chat_logprobs(self.tok, d.events), "refusal": None} if self.chat else None
                lp = lp if self.chat else comp_lp[d.index].add(self.tok, d.events)
            if d.text or not self.chat:
                yield self._chunk([self._choice(d.index, d.text, lp, d.finish_reason if not self.chat else None)])
                lp = None
            if self.chat and d.finish_reason:
                yield self._chunk([self._choice(d.index, "", lp, d.finish_reason)])
        if self.include_usage:
            body = self._envelope(self.object + ".chunk" if self.chat else self.object, [])
            body["usage"] = usage(self.gen)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def models_list(model: ServedModel) -> dict:
    created = int(model.loaded_at or time.time())
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created, "owned_by": "llmcli"}]}
