"""The exception types that reach the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the CLI prints `error: <message>` and exits 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class NotDownloaded(UserError):
    """A Hub repo spec that is not in the local cache; the CLI may offer `llm pull` for it.

    `spec` is what the user typed; the default message names the command that fetches it.
    """

    def __init__(self, spec: str, message: str | None = None):
        super().__init__(message or f"{spec} is not downloaded; run `llm pull {spec}` first")
        self.spec = spec
