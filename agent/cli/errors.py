"""The one exception a verb raises to end with a message and an exit code."""

from __future__ import annotations

USAGE = 2
FAILURE = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = FAILURE) -> None:
        super().__init__(message)
        self.code = code
