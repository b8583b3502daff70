"""ASGI middleware of `llm serve`: RequestLog (one log line per request) and BodyLimit (413 by Content-Length)."""

from __future__ import annotations

import json
import logging
import time

from llmcli.serve.errors import APIError

log = logging.getLogger("uvicorn.error")  # uvicorn's own handler and format; its access log is turned off


class RequestLog:
    """Logs `METHOD PATH STATUS, N tokens, T ms` once a response has been sent in full (streams included).

    The routes put the request's token count into scope["state"]["tokens"] (Starlette's request.state)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            tokens = state.get("tokens")
            what = f", {tokens} tokens" if tokens is not None else ""
            ms = (time.perf_counter() - t0) * 1000
            log.info("%s %s %s%s, %.0f ms", scope["method"], scope["path"], status[0] or "-", what, ms)


class BodyLimit:
    """413, in the API's error shape, for a body whose Content-Length is over max_bytes, before reading any of it
    (FastAPI's own max_body_size then counts bodies sent without a length; its refusal reaches the app's handler)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if scope["type"] != "http" or not length.isdigit() or int(length) <= self.max_bytes:
            return await self.app(scope, receive, send)
        err = APIError(413, f"the request body is over the limit of {self.max_bytes:,} bytes")
        body = json.dumps(err.ollama_body() if scope["path"].startswith("/api/") else err.openai_body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
