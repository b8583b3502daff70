"""The FastAPI app of `llm serve`: routes only. Protocol conversion lives in openai_protocol / ollama_protocol,
generation in generation, refusals in errors; this module wires them to paths, the API key and the handlers
that keep every failure a JSON error (never a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from llmcli.errors import UserError
from llmcli.hub.inspect import show_model
from llmcli.serve import ollama_protocol as ollama
from llmcli.serve import openai_protocol as openai
from llmcli.serve.errors import APIError
from llmcli.serve.generation import Generation, Generations, Job
from llmcli.serve.metrics import Metrics
from llmcli.serve.middleware import BodyLimit, RequestLog
from llmcli.serve.model import ServedModel

log = logging.getLogger("uvicorn.error")
MAX_BODY_BYTES = 8 * 2**20  # far past any prompt a context holds; a larger body is refused (413), not buffered
SHUTDOWN_GRACE_S = 2.0  # in-flight requests' time to finish when the app shuts down (server.py starts it on a signal)
CLIENT_GONE = 499  # nginx's "client closed request": the log line of a whole reply whose client left before it


def _invalid(errors) -> APIError:
    """400 naming the first field pydantic refused."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return APIError(400, f"{loc or 'body'}: {first['msg']}", param=loc or None)


async def _parse(request: Request, cls: type[BaseModel]):
    """The JSON body as `cls`, whatever its Content-Type says (curl's default form type included, as Ollama and
    llama.cpp's server take it); 400 for a body that is not JSON or not a valid request."""
    try:
        return cls.model_validate_json(await request.body() or b"{}")
    except ValidationError as e:
        raise _invalid(e.errors()) from None


def _error_response(request: Request, err: APIError) -> JSONResponse:
    native = request.url.path.startswith("/api/")
    return JSONResponse(err.ollama_body() if native else err.openai_body(), status_code=err.status)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(request, exc)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):  # e.g. a model without a chat template
        return _error_response(request, APIError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error_response(request, _invalid(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        words = {
            404: f"no route {request.method} {request.url.path}",
            413: f"the request body is over the limit of {MAX_BODY_BYTES:,} bytes",
        }
        return _error_response(request, APIError(exc.status_code, words.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)  # the traceback goes to the log only
        return _error_response(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def create_app(model: ServedModel, api_key: str | None = None) -> RequestLog:  # an ASGI app
    """The ASGI app serving `model`; with api_key every inference route needs `Authorization: Bearer KEY`."""
    metrics = Metrics(lambda: model.engine.stats() if model.engine is not None else None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        model.start_loading()  # HTTP answers (503) while the weights load
        yield
        await model.shutdown(SHUTDOWN_GRACE_S)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    app = FastAPI(
        title="llm serve",
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    _install_handlers(app)
    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health():
        if not model.ready:
            body = {"status": "error", "error": model.error} if model.error else {"status": "loading"}
            return JSONResponse(body, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    @app.head("/")
    async def root():
        return PlainTextResponse("Ollama is running")

    _openai_routes(app, model, metrics, guarded)
    _ollama_routes(app, model, metrics, guarded)
    return RequestLog(BodyLimit(app, MAX_BODY_BYTES))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, collect: Awaitable[dict]) -> dict | None:
    """The whole (non-streamed) reply, or None when the client disconnects first: collecting is then cancelled,
    which aborts the request (Generation.deltas), so it leaves the batch at the engine's next step and frees its
    KV blocks, as a streamed request's disconnect does."""
    reply = asyncio.ensure_future(collect)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not reply.done():
            reply.cancel()  # the client left (or this handler was cancelled): stop generating for it
            with contextlib.suppress(asyncio.CancelledError):
                await reply  # its abort has been posted when this returns
    return None if reply.cancelled() else reply.result()


def _run(request: Request, model: ServedModel, metrics: Metrics, jobs: list[Job]) -> Generation | Generations:
    """Submit the request's jobs (one, or one per prompt of a completions list), before any response starts."""
    gen = (
        Generation(model, metrics, jobs[0])
        if len(jobs) == 1
        else Generations([Generation(model, metrics, j) for j in jobs])
    )
    gen.start()
    request.state.gen = gen
    return gen


def _openai_routes(app: FastAPI, model: ServedModel, metrics: Metrics, guarded: list) -> None:
    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return openai.models_list(model)

    async def respond(request: Request, body: openai.ChatRequest | openai.CompletionRequest, chat: bool):
        model.check_name(body.model)
        model.require()
        jobs = [openai.chat_job(body, model)] if chat else openai.completion_jobs(body, model)
        reply = openai.Reply(_run(request, model, metrics, jobs), model.name, chat, body.include_usage)
        if body.stream:
            return StreamingResponse(_counted(request, reply.sse(), sse=True), media_type="text/event-stream")
        out = await _whole(request, reply.collect())
        request.state.tokens = request.state.gen.completion_tokens
        return out if out is not None else Response(status_code=CLIENT_GONE)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request):
        return await respond(request, await _parse(request, openai.ChatRequest), True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        return await respond(request, await _parse(request, openai.CompletionRequest), False)


async def _counted(request: Request, chunks, sse: bool):
    """The stream as it is, noting the generated token count for the request's log line as it goes. A failure
    once the response has started (an engine step that raised) ends the stream with an error object, in the
    stream's own format, instead of cutting the connection; the log gets one line."""
    try:
        async for chunk in chunks:
            request.state.tokens = request.state.gen.completion_tokens
            yield chunk
    except Exception as e:  # noqa: BLE001 - the status line is sent already: say it in the stream
        log.error("%s %s failed mid-stream: %s: %s", request.method, request.url.path, type(e).__name__, e)
        err = APIError(500, f"generation failed: {type(e).__name__}: {e}")
        if sse:
            yield f"data: {json.dumps(err.openai_body())}\n\ndata: [DONE]\n\n"
        else:
            yield json.dumps(err.ollama_body()) + "\n"
    request.state.tokens = request.state.gen.completion_tokens


def _ollama_routes(app: FastAPI, model: ServedModel, metrics: Metrics, guarded: list) -> None:
    info_cache: dict = {}

    def info() -> dict:
        if not info_cache:
            info_cache.update(show_model(model.path))
        return info_cache

    async def respond(request: Request, body, chat: bool):
        model.check_name(body.model)
        model.require()
        if not chat and not body.prompt and not body.raw:  # Ollama: an empty prompt just loads the model
            return {
                "model": model.name,
                "created_at": ollama._now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        job = ollama.chat_job(body, model) if chat else ollama.generate_job(body, model)
        reply = ollama.Reply(_run(request, model, metrics, [job]), model.name, chat)
        if body.stream:
            return StreamingResponse(_counted(request, reply.lines(), sse=False), media_type="application/x-ndjson")
        out = await _whole(request, reply.collect())
        request.state.tokens = request.state.gen.completion_tokens
        return out if out is not None else Response(status_code=CLIENT_GONE)

    @app.post("/api/chat", dependencies=guarded)
    async def chat(request: Request):
        return await respond(request, await _parse(request, ollama.ChatRequest), True)

    @app.post("/api/generate", dependencies=guarded)
    async def generate(request: Request):
        return await respond(request, await _parse(request, ollama.GenerateRequest), False)

    @app.get("/api/tags", dependencies=guarded)
    async def tags():
        return {"models": [ollama.tag(model, info())]}

    @app.post("/api/show", dependencies=guarded)
    async def show(request: Request):
        body = await _parse(request, ollama.ShowRequest)
        model.check_name(body.model or body.name)
        return ollama.show(model, info())

    @app.get("/api/ps", dependencies=guarded)
    async def ps():
        return ollama.ps(model, info())

    @app.get("/api/version")
    async def version():
        return ollama.version()
