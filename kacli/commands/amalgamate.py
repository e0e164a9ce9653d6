"""``kacli amalgamate``: train the student from the images and the teacher cache, or with the teachers
run in the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kacli.commands._common import (
    BatchSize, Device, Ema, Epochs, Force, Lr, Resume, cli_errors, console, train_overrides,
)

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.



def register(app: typer.Typer) -> None:
    app.command(
        "amalgamate",
        epilog=(
            "Example: kacli amalgamate --cache cache.h5 --method ka --compress redundancy --epochs 50 "
            "--out runs/student. Teachers online (no cache): kacli amalgamate --teacher runs/teacher-a "
            "--teacher runs/teacher-b --tasks tasks/tasks.yaml --epochs 50 --out runs/student"
        ),
    )(amalgamate_cmd)


@cli_errors
def amalgamate_cmd(
    cache: Optional[Path] = typer.Option(
        None, "--cache", metavar="FILE", show_default=False,
        help="Teacher cache written by cache-teachers (or give --teacher to run the teachers online).",
    ),
    teacher: Optional[List[Path]] = typer.Option(
        None, "--teacher", metavar="CKPT_OR_RUN_DIR", show_default=False,
        help="Teacher checkpoint or run folder, one per task in tasks.yaml's order (repeat; needs --tasks): "
        "the teachers run in the training loop on fresh views every epoch instead of reading a cache.",
    ),
    out: Path = typer.Option(..., "--out", metavar="RUN_DIR", show_default=False,
                             help="Run folder (best.pt, last.pt, metrics.jsonl, config.yaml)."),
    tasks: Optional[Path] = typer.Option(
        None, "--tasks", metavar="FILE", show_default=False,
        help="tasks.yaml; must be the one the cache was made from (default: the one it names); "
        "required with --teacher.",
    ),
    config: Optional[str] = typer.Option(
        None, "--config", metavar="FILE", show_default=False,
        help="YAML config (method, weights, sa, ta, model, aug, train); model/aug/train default to the teachers'.",
    ),
    method: Optional[str] = typer.Option(
        None, "--method", show_default=False,
        help="ka (default) | raw (DETR on ground truth) | raw-ext (extended student, ground truth) | sag | "
        "raw-partial (DETR, partial-label loss: --gt-loss mask or marginal) | pseudo (DETR on ground truth + the "
        "teachers' hard pseudo-labels).",
    ),
    gt_loss: Optional[str] = typer.Option(
        None, "--gt-loss", show_default=False,
        help="Ground-truth loss on images annotated only for some categories (merge-tasks): mask (default: their "
        "other categories leave the softmax) | marginal (as mask, and a query matched to no object may also be "
        "one of those categories) | pseudo-gt (the teachers' confident predictions added) | none.",
    ),
    ta_only: Optional[List[str]] = typer.Option(
        None, "--ta-only", metavar="TASK",
        help="With --teacher: a task whose transformers-folder teacher teaches through TA only, even when its "
        "sequences fit (repeat; for a cache, give it to cache-teachers).",
    ),
    allow_val: bool = typer.Option(
        False, "--allow-val", help="Train on a cache of a split other than train (e.g. val); refused otherwise.",
    ),
    no_sa: bool = typer.Option(False, "--no-sa", help="Turn sequence-level amalgamation (SA) off."),
    no_ta: bool = typer.Option(False, "--no-ta", help="Turn task-level amalgamation (TA) off."),
    gt_weight: Optional[float] = typer.Option(
        None, "--gt-weight", metavar="W", show_default=False,
        help="Weight λ_d of the ground-truth loss (default 0.1; 0 = label-free).",
    ),
    compress: Optional[str] = typer.Option(
        None, "--compress", show_default=False, help="none (default) | redundancy | isometric | random.",
    ),
    compress_guide: Optional[float] = typer.Option(
        None, "--compress-guide", metavar="F", show_default=False,
        help="Fraction of the epochs in which redundancy compression picks tokens from the teachers' "
        "sequences (default 1.0, the paper's rule); later epochs pick from the student's own, as evaluation does.",
    ),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    ema: Ema = None,
    backbone_weights: Optional[Path] = typer.Option(
        None, "--backbone-weights", metavar="FILE", show_default=False,
        help="torchvision ResNet (or DETR) state_dict file for the student's backbone.",
    ),
    device: Device = None,
    resume: Resume = False,
    force: Force = False,
):  # fmt: skip
    """Train one student from the teacher cache, or with the teachers run online: SA + TA + ground truth, or a baseline.

    The student detects the union of the teachers' categories; its checkpoint evaluates and predicts like any model (kacli eval, kacli predict)."""
    from kacli.amalgamate import amalgamate

    overrides = {
        "method": method,
        "gt_loss": gt_loss,
        "compress": compress,
        "compress_guide": compress_guide,
        "lambda_d": gt_weight,
        "sa.enabled": False if no_sa else None,
        "ta.enabled": False if no_ta else None,
        **train_overrides(epochs, batch_size, lr, ema),
    }
    result = amalgamate(
        cache, tasks, None, out, resume=resume, backbone_weights=backbone_weights, device=device,
        teachers=teacher or None, config=config, overrides=overrides, force=force, allow_val=allow_val,
        log=console.print, ta_only=ta_only or (),
    )
    from kacli.progress import is_main_process

    if is_main_process():  # under torchrun, one table (rank 0's, which validated), not one per rank
        console.print(summary_table(result))


def summary_table(result: dict) -> Table:
    """The last epoch's losses and validation metrics, one row each."""
    last = result.get("last") or {}
    table = Table(title=f"student ({result['method']}) → {result['out']}")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")

    def fmt(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    table.add_row("epochs", fmt(last.get("epoch")))
    table.add_row("train seconds", f"{result.get('train_seconds', 0):.0f}")
    for key, label in (("total", "loss"), ("loss_seq", "L_seq"), ("loss_task", "L_task"), ("loss_d", "L_d (ground truth)")):
        if key in last:
            table.add_row(label, fmt(last[key]))
    for key in ("AP", "AP50", "AP75"):
        if key in last:
            table.add_row(key, fmt(last[key]))
    for name, v in (last.get("per_task") or {}).items():
        table.add_row(f"AP {name}", fmt(v.get("AP") if isinstance(v, dict) else v))
    return table
