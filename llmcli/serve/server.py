"""run_server: `llm serve`'s uvicorn server on the app, ending cleanly on SIGINT or SIGTERM.

On a signal it stops accepting connections, gives in-flight requests ENGINE_GRACE_S seconds to finish (then the
engine aborts what is left, which ends their streams) and returns, so the command exits 0. uvicorn itself would
re-raise the signal after its graceful shutdown (exit 130 / killed by SIGTERM); Server's capture_signals keeps the
handlers without that.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from llmcli.serve.app import create_app
from llmcli.serve.model import ServedModel

ENGINE_GRACE_S = 2.0  # seconds in-flight requests get to finish after SIGINT / SIGTERM; then they are aborted
GRACE_S = 5  # seconds uvicorn waits for open connections before cancelling them (a last resort)
DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
# llama.cpp's llama-server default: editors and OpenAI-client presets for a local server point at
# http://localhost:8080/v1; Ollama's 11434 is left to Ollama, which may run beside it.
DEFAULT_PORT = 8080


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, model: ServedModel):
        super().__init__(config)
        self.model = model

    def handle_exit(self, sig, frame) -> None:
        """The first signal also starts the engine's shutdown: in-flight streams end within ENGINE_GRACE_S (the
        engine aborts what is left), so uvicorn's wait for open connections ends before its own timeout."""
        if not self.should_exit:
            self.model.begin_shutdown(ENGINE_GRACE_S)  # signal handlers run on the main thread, the loop's own
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(model: ServedModel, host: str, port: int, api_key: str | None = None) -> None:
    """Serve until SIGINT / SIGTERM (blocks); the model loads in the background once the socket is bound."""
    config = uvicorn.Config(
        create_app(model, api_key),
        host=host,
        port=port,
        access_log=False,  # RequestLog writes one line per request, with its token count
        timeout_graceful_shutdown=GRACE_S,
        log_level="info",
        lifespan="on",
    )
    server = Server(config, model)
    model.on_failure = lambda: setattr(server, "should_exit", True)  # uvicorn's loop polls the flag
    server.run()
