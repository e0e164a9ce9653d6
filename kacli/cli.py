"""The ``kacli`` command: a Typer app with one subcommand per stage.

Each stage's command lives in ``kacli/commands/<module>.py`` and exposes ``register(app)``.
Command functions only parse their options and call into the library; a :class:`KacliError`
raised by the library is printed as one line and exits with code 2 (see ``commands/_common.py``).
"""

from __future__ import annotations

import typer

from kacli import __version__
from kacli.commands import ablate, amalgamate, cache, data, demo, evaluate, models, report, train

# Order here is the order of ``kacli --help``: the pipeline's stages first.
COMMAND_MODULES = [data, train, evaluate, cache, amalgamate, report, models, demo, ablate]

app = typer.Typer(
    name="kacli",
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
