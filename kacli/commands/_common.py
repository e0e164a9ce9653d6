"""What every subcommand shares: one-line errors with exit code 2, and the console."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from kacli.errors import EXIT_BAD_INPUT, KacliError

console = Console()
err_console = Console(stderr=True)


def cli_errors(fn):
    """Decorate a command so that a :class:`KacliError` prints ``error: <path>: <problem>``
    on one line to stderr and exits with code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KacliError as e:
            err_console.print(f"[bold red]error:[/] {escape(e.one_line())}", highlight=False, soft_wrap=True, markup=True)
            sys.stderr.flush()
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper
