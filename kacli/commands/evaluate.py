"""``kacli eval``: pycocotools AP of one model or of several as an ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def metrics_table(result: dict) -> Table:
    rows = (result.get("members") or []) + ([result] if result.get("members") else [result])
    tasks = sorted({t for r in rows for t in (r.get("per_task") or {})})
    table = Table(title=f"{result.get('split', 'val')} split: bbox AP (pycocotools, %)")
    for col in ["model", "AP", "AP50", "AP75", "APs", "APm", "APl", *[f"AP {t}" for t in tasks], "params", "GFLOPs"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        per = r.get("per_task") or {}
        table.add_row(
            str(r.get("model")),
            *[_pct(r.get(k)) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")],
            *[_pct((per.get(t) or {}).get("AP")) for t in tasks],
            f"{r['params'] / 1e6:.2f}M" if r.get("params") else "–",
            f"{r['gflops']:.3g}" if r.get("gflops") is not None else "–",
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @cli_errors
    def eval_cmd(
        model: List[Path] = typer.Option(..., "--model", help="Checkpoint, run folder or transformers object-detection folder; repeat for an ensemble."),
        tasks: Path = typer.Option(..., "--tasks", help="tasks.yaml written by split-tasks."),
        split: Optional[str] = typer.Option(
            None, "--split", show_default=False,
            help="Split to evaluate on (default: test when tasks.yaml has one, else val; runs select their "
                 "checkpoint on val, so report on test)."),
        size: Optional[int] = typer.Option(None, "--size", help="Shorter side at evaluation (default: the model's)."),
        max_size: Optional[int] = typer.Option(None, "--max-size", help="Cap on the longer side."),
        batch_size: int = typer.Option(8, "--batch-size"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
        detections: Optional[Path] = typer.Option(
            None, "--detections", metavar="FILE",
            help="Write every detection as a COCO results file ([{image_id, category_id, bbox, score}], "
            "the dataset's ids; what pycocotools' loadRes reads).",
        ),
        force: bool = typer.Option(False, "--force", help="Replace existing --json and --detections files."),
    ):
        """Bbox AP (pycocotools) per category and per task, params and GFLOPs; several --model
        are scored one by one and as the teachers' ensemble.

        Example: kacli eval --model runs/round --model runs/angular --tasks tasks/tasks.yaml --json eval.json
        """
        from kacli.eval.evaluate import evaluate_checkpoints
        from kacli.fsutil import check_output_file, write_json

        if json_out:
            check_output_file(json_out, force)  # before the evaluation: a bad target costs nothing
        result = evaluate_checkpoints(model, tasks, split=split, size=size, max_size=max_size,
                                      device_pref=device, batch_size=batch_size,
                                      detections_out=detections, force=force)
        console.print(metrics_table(result))
        conv = result.get("flops_convention")
        if conv:
            console.print(f"GFLOPs: {conv}", style="dim")
        if json_out:
            write_json(json_out, result, force=force)
            console.print(f"metrics written to {json_out}")
        if detections:
            console.print(f"detections written to {detections} (COCO results format)", highlight=False)
