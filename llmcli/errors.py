"""The one exception type that reaches the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the CLI prints `error: <message>` and exits 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
