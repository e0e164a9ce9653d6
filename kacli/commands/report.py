"""``kacli report``: the results table and learning curves for any runs and evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    app.command(
        "report",
        epilog=(
            "Example: kacli report runs/teacher-t1/eval.json runs/teacher-t2/eval.json "
            "ensemble.json runs/raw runs/student --out report"
        ),
    )(report)


@cli_errors
def report(
    inputs: List[Path] = typer.Argument(
        ...,
        metavar="RUN_DIR_OR_EVAL_JSON",
        help="Run directories (metrics.jsonl, eval.json) and/or eval JSON files (kacli eval --json).",
        show_default=False,
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for report.json, report.md, curves.png and training.png (created if missing).",
        show_default=False
    ),
):
    """Print the paper's Table I for the given runs (AP, AP50, AP75, per-task AP, #param., FLOPs,
    training time) and write it with the validation-AP curves (Fig. 4) and the training curves
    (every loss term and the learning rate) to --out. A run still training can be reported."""
    from kacli.report import load_all, rows_table, write_report

    rows, curves, training = load_all(inputs)
    console.print(rows_table(rows))
    if out is not None:
        files = write_report(rows, curves, out, training)
        console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False)
