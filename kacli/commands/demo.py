"""``kacli demo``: the whole pipeline on generated data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @cli_errors
    def demo_cmd(
        out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo makes."),
        minutes: float = typer.Option(12.0, "--minutes", help="Budget: scales every stage's epochs."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data and of every training."),
        train_images: Optional[int] = typer.Option(None, "--train-images", help="Override the demo's 2,000."),
        val_images: Optional[int] = typer.Option(
            None, "--val-images", help="Override the demo's 300 (checkpoint selection)."),
        test_images: Optional[int] = typer.Option(
            None, "--test-images", min=1, help="Override the demo's 500 (every reported figure)."),
        arch: str = typer.Option(
            "conditional", "--arch",
            help="The teachers' architecture: conditional (tiny Conditional DETR, the default) or detr (tiny DETR: "
                 "the same sizes and schedule); the students and raw take it too."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
        scenario: str = typer.Option(
            "split", "--scenario",
            help="split: one dataset split into 2 tasks (the paper's setting). cross-dataset: two halves of the "
                 "images, each annotated for one task only, merged; adds the raw-partial and pseudo baselines "
                 "and per-source metrics.",
        ),
    ):
        """Generate shapes, split them into 2 tasks, train a teacher per task, cache them, amalgamate a
        student (full and slim), train the raw baseline, and compare them all (the paper's Table I).

        Example: kacli demo --out demo-out;  kacli demo --scenario cross-dataset --out demo-xd
        """
        from kacli.demo import run_demo
        from kacli.report import load_rows, rows_table

        summary = run_demo(out, minutes=minutes, seed=seed, force=force, train_images=train_images,
                           val_images=val_images, log=console.print, scenario=scenario, test_images=test_images, arch=arch)
        rows = load_rows([out / "eval" / f"{r['model']}.json" for r in summary["rows"]])
        console.print(rows_table(rows))
        console.print(
            f"demo finished in {summary['seconds'] / 60:.1f} min; report in {out / 'report.md'}, "
            f"curves in {out / 'curves.png'}, pictures in {out / 'predictions'}"
        )
