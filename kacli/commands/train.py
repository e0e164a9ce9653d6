"""``kacli train-teacher``: fine-tune one DETR per task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kacli.commands._common import (
    BatchSize, Device, Ema, Epochs, Force, Lr, Resume, cli_errors, console, train_overrides,
)

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    @app.command("train-teacher")
    @cli_errors
    def train_teacher_cmd(
        tasks: Path = typer.Option(..., "--tasks", help="tasks.yaml written by split-tasks."),
        task: str = typer.Option(..., "--task", help="Name of the task this teacher learns."),
        out: Path = typer.Option(..., "--out", help="Run folder (best.pt, last.pt, metrics.jsonl, config.yaml)."),
        config: Optional[str] = typer.Option(
            None, "--config", help="YAML run config or a preset name: tiny, detr-r50 (default)."
        ),
        init: Optional[Path] = typer.Option(
            None, "--init", help="Start from a kacli, facebookresearch/detr or UP-DETR checkpoint."
        ),
        backbone_weights: Optional[Path] = typer.Option(
            None, "--backbone-weights", help="torchvision ResNet state_dict file for the backbone."
        ),
        epochs: Epochs = None,
        batch_size: BatchSize = None,
        lr: Lr = None,
        ema: Ema = None,
        workers: Optional[int] = typer.Option(None, "--workers", help="Override train.workers."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Override train.seed."),
        device: Device = None,
        resume: Resume = False,
        force: Force = False,
    ):
        """Fine-tune one DETR on one task of a manifest.

        Example: kacli train-teacher --tasks tasks/tasks.yaml --task round --config tiny --out runs/round
        """
        from kacli.teacher import train_teacher

        overrides = {
            **train_overrides(epochs, batch_size, lr, ema),
            "train.workers": workers,
            "train.seed": seed,
            "train.device": device,
        }
        result = train_teacher(
            tasks, task, out, config=config, overrides=overrides, init=init,
            backbone_weights=backbone_weights, resume=resume, force=force, log=console.print,
        )
        from kacli.progress import is_main_process

        if not is_main_process():
            return
        last = result.get("last") or {}
        ap = last.get("AP")
        console.print(
            f"teacher [bold]{task}[/]: {result['train_seconds']:.0f} s of training"
            + (f", validation AP {ap:.3f} (AP50 {last.get('AP50', 0):.3f})" if ap is not None else "")
            + f"; checkpoints in {out}"
        )
