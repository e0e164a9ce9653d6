"""Training one teacher: a DETR fine-tuned on one task of a manifest (``kacli train-teacher``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kacli import training
from kacli.config import config_to_dict
from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.engine.train import to_device
from kacli.losses.criterion import SetCriterion, detection_criterion
from kacli.models.detr import DETR
from kacli.models.import_detr import init_from_checkpoint
from kacli.runconfig import load_run_config


def detr_loss_fn(criterion: SetCriterion) -> Callable:
    """Loss callable for :class:`Trainer`: DETR's set criterion on a collated batch."""

    def loss_fn(model, batch, device):
        images, mask, targets = batch
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = to_device([{"boxes": t["boxes"], "labels": t["labels"]} for t in targets], device)
        out = model(images, mask)
        losses = criterion(out, targets)
        losses.pop("class_error", None)
        return losses

    return loss_fn


def train_teacher(
    tasks: str | Path,
    task: str,
    out: str | Path,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    init: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune one DETR on ``task`` of the manifest ``tasks``; writes ``out/{best,last}.pt``,
    ``metrics.jsonl`` and ``config.yaml``. Returns the trainer's summary.

    Every input is read and checked before the run folder is touched; a new run (``force`` over
    an old one included) replaces ``out`` only when it has saved its first checkpoint
    (:mod:`kacli.engine.rundir`)."""
    manifest = TaskManifest(tasks)
    info = manifest.require_trainable(task)  # a teacher-only task has nothing to train on
    cfg = load_run_config(config, overrides or {})
    out = Path(out)
    with training.run_folder(out, resume, force) as run_dir:  # locked until the run ends
        return _train(manifest, info, cfg, out, run_dir, task, init, backbone_weights, resume, log)


def _train(manifest, info, cfg, out, run_dir, task, init, backbone_weights, resume, log) -> dict:
    dist = training.start_distributed(cfg.train.device)

    label_map = info.label_map()
    train_set = CocoDetection(
        manifest.split_json("train", info.name), manifest.image_root("train"), label_map["ids"],
        train=True, aug=cfg.aug, generator_seed=cfg.train.seed,
    )
    training.seed_model(cfg.train.seed)
    model = DETR(cfg.model, len(label_map["ids"]))
    training.load_backbone(model, backbone_weights, log, detail=True)
    if init and not resume:
        rep = init_from_checkpoint(model, init, len(label_map["ids"]))
        log(f"initialised from {init}: {training.summary(rep)}")

    criterion = detection_criterion(len(label_map["ids"]), cfg.model.classifier, eos_coef=0.1)
    evaluate = training.validator(manifest, label_map, cfg.aug, cfg.train, dist)
    setup = training.train_setup(
        out, cfg.train, run_dir,
        kind="detr",
        arch=cfg.model.to_dict(),
        label_map=label_map,
        task=info.name,
        config=config_to_dict(cfg),
        inputs=training.input_hashes(manifest, files={"init": init, "backbone_weights": backbone_weights}),
        meta={"role": "teacher", "tasks_path": str(manifest.path.resolve())},
        signature={"task": info.name, "tasks.yaml": manifest.sha256, "arch": cfg.model.to_dict()},
        log_name=f"teacher {info.name}",
    )
    return training.fit(model, detr_loss_fn(criterion), train_set, collate, setup, dist, evaluate, resume)
