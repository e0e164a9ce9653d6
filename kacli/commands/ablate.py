"""``kacli ablate``: the paper's ablation rows on the demo data."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    @app.command("ablate")
    @cli_errors
    def ablate_cmd(
        out: Path = typer.Option(Path("ablation"), "--out", help="Folder of the ablation (a rerun continues it)."),
        minutes: float = typer.Option(12.0, "--minutes", help="The demo's budget: scales every training's epochs."),
        seeds: int = typer.Option(1, "--seeds", help="Repeat every row for demo seeds 0 … S−1 (mean ± std)."),
        rows: Optional[str] = typer.Option(
            None, "--rows", help="Comma-separated rows (default all): raw, raw-ext, sa, sag, ta, ta-lf, sa+ta, "
                                 "sa+ta-lf, redundancy, isometric, random."),
        settings: List[str] = typer.Option(
            [], "--set", metavar="KEY=VALUE", help="An amalgamate config key for every row, e.g. ta.noobj_weight=0."),
        demos: List[Path] = typer.Option(
            [], "--demo", help="A finished `kacli demo` folder: its data, teachers and cache serve its seed."),
        train_images: Optional[int] = typer.Option(None, "--train-images", help="Override the demo's 2,000."),
        val_images: Optional[int] = typer.Option(None, "--val-images", help="Override the demo's 300."),
    ):
        """Train and evaluate the rows of the paper's Table V (raw, raw-ext, SA, SAG, TA, SA+TA, label-free)
        and Fig. 6b (redundancy, isometric and random compression) on the demo's data and teachers; writes
        ablation.md, ablation.json and curves.png.

        Example: kacli ablate --out ablation --seeds 3
        """
        from kacli.ablate import ablation_table, parse_rows, parse_settings, run_ablation

        result = run_ablation(out, minutes=minutes, seeds=seeds, rows=parse_rows(rows),
                              settings=parse_settings(settings), demos=demos, train_images=train_images,
                              val_images=val_images)
        console.print(ablation_table(result))
        console.print(f"ablation finished in {result['seconds'] / 60:.1f} min; {out / 'ablation.md'}, "
                      f"{out / 'curves.png'}")
