"""The ``kacli`` command: a Typer app with one subcommand per stage.

Each stage's command lives in ``kacli/commands/<module>.py`` and exposes ``register(app)``.
Command functions only parse their options and call into the library; a :class:`KacliError`
raised by the library is printed as one line and exits with code 2 (see ``commands/_common.py``),
and so is a usage error (a value of the wrong type, an unknown option or command: :class:`KacliGroup`).
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from kacli import __version__
from kacli.commands import ablate, amalgamate, cache, data, demo, evaluate, models, report, train
from kacli.commands._common import print_error
from kacli.errors import EXIT_BAD_INPUT, KacliError

# Click's exceptions: Typer ≥ 0.20 carries its own copy of click (whose ClickException is a
# typer.TyperException), earlier versions use click itself.
try:
    import click

    CLICK_ERRORS: tuple[type[Exception], ...] = (click.ClickException,)
except ImportError:  # pragma: no cover
    CLICK_ERRORS = ()
CLICK_ERRORS += tuple(e for e in (getattr(typer, "TyperException", None),) if e is not None)


def _no_args_is_help(e: Exception) -> bool:
    """Plain ``kacli``: Typer shows the help (matched by name, as Typer does)."""
    return type(e).__name__ == "NoArgsIsHelpError"


def usage_error(e: Exception) -> KacliError:
    """A usage error (``--seeds abc``, an unknown option, a missing argument) as one line naming the
    command and where its help is, instead of Typer's usage box."""
    message = e.format_message()
    message = message[:1].lower() + message[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is None:
        return KacliError(message)
    return KacliError(f"{message.rstrip('.')} (see --help)", ctx.command_path)


class KacliGroup(TyperGroup):
    """The root command: every click usage error, its own or a subcommand's, becomes
    ``error: <command>: <problem>`` on one line with exit code 2, like every other error.
    (Parsing happens in ``make_context`` for the root and in ``invoke`` for the subcommand.)"""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except CLICK_ERRORS as e:
            if _no_args_is_help(e):
                raise
            print_error(usage_error(e))
            raise typer.Exit(EXIT_BAD_INPUT) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CLICK_ERRORS as e:
            if _no_args_is_help(e):
                raise
            print_error(usage_error(e))
            raise typer.Exit(EXIT_BAD_INPUT) from None


# Order here is the order of ``kacli --help``: the pipeline's stages first.
COMMAND_MODULES = [data, train, evaluate, cache, amalgamate, report, models, demo, ablate]

app = typer.Typer(
    name="kacli",
    cls=KacliGroup,
    help="Knowledge amalgamation for DETR detectors: train one student from several expert teachers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"kacli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """kacli: amalgamate several DETR teachers, each an expert on part of a label set, into one student.

    Pipeline: make-demo-data / split-tasks → train-teacher → cache-teachers → amalgamate → eval.
    """


for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
