"""Training one teacher: a DETR fine-tuned on one task of a manifest (``kacli train-teacher``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kacli.config import TrainConfig, apply_overrides, config_to_dict, load_config
from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.data.transforms import AUG_PRESETS, AugConfig
from kacli.engine.distributed import init_distributed
from kacli.engine.rundir import RunDir
from kacli.engine.train import Trainer, TrainSetup, to_device
from kacli.errors import KacliError
from kacli.eval.evaluate import evaluate_model, make_eval_dataset
from kacli.fsutil import load_json, sha256_file
from kacli.losses.criterion import SetCriterion
from kacli.losses.matcher import HungarianMatcher
from kacli.models.config import PRESETS as MODEL_PRESETS
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR

@dataclass
class DetrRunConfig:
    """What a DETR training run reads from ``--config``: architecture, augmentation, optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RUN_PRESETS: dict[str, DetrRunConfig] = {
    # The paper's setting: DETR-R50 fine-tuned (UP-DETR schedule: 150 epochs, drop at 100).
    "detr-r50": DetrRunConfig(model=MODEL_PRESETS["detr-r50"], aug=AUG_PRESETS["detr"], train=TrainConfig()),
    # For 2 CPU cores: a 0.47 M-parameter DETR on the demo's 64-px images, trained from scratch,
    # so the backbone learns at the same rate as the rest; 32 epochs of the 2,000 demo images
    # (1,984 steps of 32) take about 2.5 minutes. docs/DEMO.md says how it was chosen.
    "tiny": DetrRunConfig(
        model=MODEL_PRESETS["tiny"],
        aug=AUG_PRESETS["demo"],
        train=TrainConfig(
            epochs=32, batch_size=32, lr=1e-3, lr_backbone=1e-3, weight_decay=1e-4, lr_drop=1000,
            clip_max_norm=0.1, workers=0, eval_every=4,
        ),
    ),
}


def load_run_config(source: str | Path | None, overrides: dict[str, Any]) -> DetrRunConfig:
    """``--config`` (a YAML file or a preset name; default ``detr-r50``) plus command-line overrides."""
    cfg = load_config(source if source is not None else "detr-r50", DetrRunConfig, RUN_PRESETS)
    cfg = apply_overrides(cfg, overrides)
    cfg.model.validate(source)
    return cfg


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
    run_dir = RunDir(out, resume, force)
    dist = init_distributed(cfg.train.device)

    label_map = info.label_map()
    train_set = CocoDetection(
        manifest.split_json("train", info.name), manifest.image_root("train"), label_map["ids"],
        train=True, aug=cfg.aug, generator_seed=cfg.train.seed,
    )
    torch.manual_seed(cfg.train.seed)
    model = DETR(cfg.model, len(label_map["ids"]))
    if backbone_weights:
        from kacli.models.backbone import load_backbone_weights

        rep = load_backbone_weights(model.backbone, backbone_weights)
        log(f"backbone weights from {backbone_weights}: {_summary(rep)}")
    if init and not resume:
        from kacli.models.import_detr import init_from_checkpoint

        rep = init_from_checkpoint(model, init, len(label_map["ids"]))
        log(f"initialised from {init}: {_summary(rep)}")

    criterion = SetCriterion(len(label_map["ids"]), HungarianMatcher(), eos_coef=0.1)
    evaluate = None
    if "val" in manifest.splits and cfg.train.eval_every > 0:
        evaluate = make_validator(manifest, label_map, cfg.aug, dist.device, cfg.train.batch_size)

    inputs = {"tasks.yaml": manifest.sha256}
    for key, p in (("init", init), ("backbone_weights", backbone_weights)):
        if p:
            inputs[key] = sha256_file(p)
    setup = TrainSetup(
        out_dir=out,
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        lr_backbone=cfg.train.lr_backbone,
        weight_decay=cfg.train.weight_decay,
        lr_drop=cfg.train.lr_drop,
        clip_max_norm=cfg.train.clip_max_norm,
        seed=cfg.train.seed,
        workers=cfg.train.workers,
        eval_every=cfg.train.eval_every,
        amp=cfg.train.amp,
        ema=cfg.train.ema,
        tensorboard=cfg.train.tensorboard,
        checkpoint_base={
            "kind": "detr",
            "arch": cfg.model.to_dict(),
            "label_map": label_map,
            "task": info.name,
            "config": config_to_dict(cfg),
            "inputs": inputs,
            "meta": {"role": "teacher", "tasks_path": str(manifest.path.resolve())},
        },
        signature={"task": info.name, "tasks.yaml": manifest.sha256, "arch": cfg.model.to_dict()},
        log_name=f"teacher {info.name}",
        run_dir=run_dir,
        checkpoint_every=cfg.train.checkpoint_every,
    )
    trainer = Trainer(model, detr_loss_fn(criterion), train_set, collate, setup, dist, evaluate=evaluate)
    return trainer.fit(resume=resume)


def make_validator(manifest: TaskManifest, label_map: dict, aug: AugConfig, device, batch_size: int):
    """Validation on the manifest's ``val`` split: AP over the model's categories, per-task AP."""
    gt_path = manifest.split_json("val")
    gt = load_json(gt_path)
    dataset = make_eval_dataset(gt_path, manifest.image_root("val"), label_map["ids"], aug.eval_size, aug.max_size)
    tasks = {t.name: t.category_ids for t in manifest.tasks}

    def evaluate(model):
        return evaluate_model(model, label_map, dataset, gt, tasks, device, batch_size=batch_size)

    return evaluate


def _summary(rep: Any) -> str:
    if isinstance(rep, dict):
        parts = []
        for k, v in rep.items():
            parts.append(f"{k} {len(v)}" if isinstance(v, (list, tuple, set)) else f"{k} {v}")
        return ", ".join(parts)
    return str(rep)

