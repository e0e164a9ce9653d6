"""The one error type the library raises for bad input.

A :class:`KacliError` is shown to the user as one line (``error: <path>: <problem>``) and
makes the command exit with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 2


class KacliError(Exception):
    """Bad input: a file that is missing, malformed, or does not match what it should.

    Args:
        message: what is wrong, as one sentence.
        path: the file or folder the problem is in, when there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = " ".join(str(message).split())
        self.path = None if path is None else str(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message
