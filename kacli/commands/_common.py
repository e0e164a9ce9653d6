"""What every subcommand shares: one-line errors with exit code 2, the console, and the training
options of ``train-teacher`` and ``amalgamate``."""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kacli.errors import EXIT_BAD_INPUT, KacliError

console = Console()
err_console = Console(stderr=True)


def os_error(e: OSError) -> KacliError | None:
    """A full disk, a read-only file system, a folder where a file should be (...) as one line
    naming the file (None for other OS errors)."""
    from kacli.fsutil import WRITE_PROBLEMS

    problem = WRITE_PROBLEMS.get(getattr(e, "errno", None))
    return None if problem is None else KacliError(problem, e.filename)


def print_error(e: KacliError) -> None:
    """``error: <path>: <problem>`` on one line to stderr (what every failing command prints)."""
    err_console.print(f"[bold red]error:[/] {escape(e.one_line())}", highlight=False, soft_wrap=True, markup=True)
    sys.stderr.flush()


def cli_errors(fn):
    """Decorate a command so that a :class:`KacliError` prints ``error: <path>: <problem>``
    on one line to stderr and exits with code 2, with no traceback; so do the OS errors of
    :data:`kacli.fsutil.WRITE_PROBLEMS` (a full disk, a read-only file system, ...) and a
    RecursionError (an input nested too deeply)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except OSError as e:  # a write the library did not wrap: the file system's problem, one line
                err = os_error(e)
                if err is None:
                    raise
                raise err from None
            except RecursionError:
                raise KacliError("an input is nested too deeply to read") from None
        except KacliError as e:
            print_error(e)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


# -- the training options train-teacher and amalgamate both take ------------------------------------
# Declared once: a command's parameter ``epochs: Epochs = None`` is the option ``--epochs`` with this
# help, the same in both commands' --help.

Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Override train.epochs.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Override train.batch_size.")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Override train.lr.")]
Ema = Annotated[Optional[float], typer.Option(
    "--ema", metavar="DECAY", show_default=False,
    help="Override train.ema: keep a moving average of the weights (decay in (0, 1), e.g. 0.9998); "
    "it is validated and saved as the checkpoint's weights.",
)]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda (override train.device).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Start over in a non-empty run folder (replaced when the new run saves its first checkpoint)."
)]


def train_overrides(epochs: int | None, batch_size: int | None, lr: float | None, ema: float | None) -> dict:
    """The ``train.*`` overrides of :data:`Epochs`, :data:`BatchSize`, :data:`Lr` and :data:`Ema`
    (None: not given, the config's value stands)."""
    return {"train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr, "train.ema": ema}
