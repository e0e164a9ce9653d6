"""``kacli ablate``: the paper's ablation rows on the demo data, in either of the demo's scenarios."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for. The row names below are
# kacli.ablate.SCENARIO_ROWS (tests/test_ablate.py checks that the help lists every one).
ROWS_HELP = (
    "Comma-separated rows of the scenario (default all). split: raw, raw-ext, sa, sa-compressed, sag, ta, "
    "ta-lf, sa+ta, sa+ta-lf, redundancy, redundancy-ours, isometric, random. cross-dataset: raw, raw-partial, "
    "raw-partial-marginal, pseudo, student, student-marginal, student-none, student-pseudo-gt, student-slim."
)


def register(app: typer.Typer) -> None:
    @app.command("ablate")
    @cli_errors
    def ablate_cmd(
        out: Path = typer.Option(Path("ablation"), "--out", help="Folder of the ablation (a rerun continues it)."),
        scenario: str = typer.Option(
            "split", "--scenario", help="split (the paper's Table V and Fig. 6b) or cross-dataset (two sources, "
                                        "each annotated for one task's categories)."),
        minutes: float = typer.Option(12.0, "--minutes", help="The demo's budget: scales every training's epochs."),
        seeds: int = typer.Option(1, "--seeds", help="Repeat every row for demo seeds 0 … S−1 (mean ± std)."),
        rows: Optional[str] = typer.Option(None, "--rows", help=ROWS_HELP),
        settings: List[str] = typer.Option(
            [], "--set", metavar="KEY=VALUE", help="An amalgamate config key for every row, e.g. ta.noobj_weight=0."),
        demos: List[Path] = typer.Option(
            [], "--demo", help="A finished `kacli demo` folder of the same scenario: its data, teachers and cache "
                               "serve its seed."),
        arch: str = typer.Option(
            "detr", "--arch",
            help="The teachers' architecture: detr (tiny DETR) or conditional (tiny Conditional DETR: the same "
                 "sizes and schedule); the students and raw take it too."),
        train_images: Optional[int] = typer.Option(None, "--train-images", help="Override the demo's 2,000."),
        val_images: Optional[int] = typer.Option(None, "--val-images", help="Override the demo's 300."),
        test_images: Optional[int] = typer.Option(None, "--test-images", help="Override the demo's test images."),
    ):
        """Train the ablation rows on the demo's data and teachers and score every row, the teachers and
        their ensemble on the test split; writes ablation.md, ablation.json and curves.png.

        --scenario split: the paper's Table V (raw, raw-ext, SA, SA compressed = sa-compressed, the paper's
        fair comparison with SAG, TA, SA+TA, label-free ta-lf and sa+ta-lf) and Fig. 6b (redundancy =
        teacher-guided as the paper, redundancy-ours = guided as the demo's slim student, isometric,
        random compression).

        --scenario cross-dataset: the student with each ground-truth loss (student = mask,
        student-marginal, student-none, student-pseudo-gt), student-slim, and the baselines raw (naive
        merge), raw-partial, raw-partial-marginal and pseudo; AP on the union and per source.

        Rows trained with labels are scored from best.pt (chosen on val), label-free rows from last.pt.

        Example: kacli ablate --out ablation --seeds 3
        """
        from kacli.ablate import ablation_table, parse_rows, parse_settings, run_ablation

        result = run_ablation(out, minutes=minutes, seeds=seeds, rows=parse_rows(rows, scenario),
                              settings=parse_settings(settings), demos=demos, train_images=train_images,
                              val_images=val_images, test_images=test_images, scenario=scenario, arch=arch)
        console.print(ablation_table(result))
        console.print(f"ablation finished in {result['seconds'] / 60:.1f} min; {out / 'ablation.md'}, "
                      f"{out / 'curves.png'}")
