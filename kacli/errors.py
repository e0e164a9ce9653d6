"""The one error type the library raises for bad input.

A :class:`KacliError` is shown to the user as one line (``error: <path>: <problem>``) and
makes the command exit with code 2, without a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

EXIT_BAD_INPUT = 2


class KacliError(Exception):
    """Bad input: a file that is missing, malformed, or does not match what it should.

    Args:
        message: what is wrong, as one sentence.
        path: the file or folder the problem is in, when there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        worker = _from_worker(str(message))
        if worker is not None:  # re-raised by a DataLoader: the worker's error is its last line
            message, path = worker, None
        self.message = " ".join(str(message).split())
        self.path = None if path is None else str(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``<path>: <problem>``; characters that would move the cursor or colour the terminal
        (a newline or an escape in a file name) are shown escaped."""
        line = f"{self.path}: {self.message}" if self.path else self.message
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


_WORKER = re.compile(r"^Caught KacliError in DataLoader worker process \d+\.")


def _from_worker(message: str) -> str | None:
    """The one line of a KacliError raised in a DataLoader worker process.

    torch re-raises a worker's exception in the main process as ``KacliError(text)`` where the
    text is ``Caught KacliError in DataLoader worker process N. Original Traceback ...`` and its
    last line is ``kacli.errors.KacliError: <path>: <problem>``; that last part is the message."""
    if not _WORKER.match(message):
        return None
    for line in reversed(message.strip().splitlines()):
        head, sep, tail = line.partition("KacliError: ")
        if sep and head.strip() in ("", "kacli.errors."):
            return tail
    return None
