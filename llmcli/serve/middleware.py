"""RequestLog: the ASGI middleware that logs one line per request of `llm serve`."""

from __future__ import annotations

import logging
import time

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
