"""APIError: a request the server refuses, with its HTTP status, in OpenAI's error shape (or Ollama's)."""

from __future__ import annotations

# status -> OpenAI's error "type" for it
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "server_error",
}


class APIError(Exception):
    """A refusal the client can act on: status, one-line message, and optionally the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def openai_body(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}, as the OpenAI API answers."""
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        """{"error": "message"}, as Ollama's native API answers (its clients read the string)."""
        return {"error": self.message}
