"""What ``train-teacher`` and ``amalgamate`` do alike to start a training run.

Both stages check the run folder (:class:`~kacli.engine.rundir.RunDir`), join the process group
and pick the device, seed torch before building the model, load the backbone weights a user
names, validate on the manifest's ``val`` split, record the sha256 of every input, and hand the
:class:`~kacli.engine.train.Trainer` one :class:`~kacli.engine.train.TrainSetup`. Each stage
keeps its own order of these steps (which input is checked first decides which error a user
sees); the steps themselves live here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kacli.data.manifest import TaskManifest
from kacli.engine.config import TrainConfig
from kacli.engine.rundir import RunDir
from kacli.engine.train import EvalFn, LossFn, TrainSetup, Trainer
from kacli.eval.validate import make_validator
from kacli.fsutil import sha256_file
from kacli.models.backbone import load_backbone_weights
from kacli.runtime import DistInfo, init_distributed


def run_folder(out: str | Path, resume: bool, force: bool) -> RunDir:
    """The run folder, checked and locked (nothing written in it yet): a new run replaces ``out``
    at its first checkpoint. Use it as a context manager: the lock is released when it ends."""
    return RunDir(Path(out), resume, force)


def start_distributed(device: str) -> DistInfo:
    """Join the process group under torchrun and pick the device (``auto``, ``cpu``, ``cuda``)."""
    return init_distributed(device)


def seed_model(seed: int) -> None:
    """Seed torch before the model is built: its random initial weights follow ``train.seed``."""
    torch.manual_seed(seed)


def summary(rep: Any) -> str:
    """A report dict as ``key N, key value, …`` (lists by their length)."""
    if isinstance(rep, dict):
        parts = []
        for k, v in rep.items():
            parts.append(f"{k} {len(v)}" if isinstance(v, (list, tuple, set)) else f"{k} {v}")
        return ", ".join(parts)
    return str(rep)


def load_backbone(model: nn.Module, path: str | Path | None, log: Callable[[str], None], *,
                  detail: bool = False) -> dict | None:
    """Load ``path``'s weights into ``model.backbone`` (nothing without a path) and log what was
    loaded: every count of the report with ``detail``, the loaded tensors alone without."""
    if not path:
        return None
    rep = load_backbone_weights(model.backbone, path)
    log(f"backbone weights from {path}: " + (summary(rep) if detail else f"loaded {rep['loaded']} tensors"))
    return rep


def validator(manifest: TaskManifest, label_map: dict, aug, train: TrainConfig, dist: DistInfo) -> EvalFn | None:
    """AP on the manifest's ``val`` split every ``train.eval_every`` epochs; None without a val
    split or with ``eval_every`` 0."""
    if "val" in manifest.splits and train.eval_every > 0:
        return make_validator(manifest, label_map, aug, dist.device, train.batch_size)
    return None


def input_hashes(manifest: TaskManifest, extra: Mapping[str, str] | None = None,
                 files: Mapping[str, str | Path | None] | None = None) -> dict[str, str]:
    """The sha256 of the run's inputs: the manifest's first, then ``extra`` (already hashed), then
    each of ``files`` that is given."""
    inputs = {"tasks.yaml": manifest.sha256, **(extra or {})}
    for key, p in (files or {}).items():
        if p:
            inputs[key] = sha256_file(p)
    return inputs


def train_setup(out: str | Path, train: TrainConfig, run_dir: RunDir, *, kind: str, arch: dict, label_map: dict,
                task: str | None, config: dict, inputs: dict, meta: dict, signature: dict, log_name: str,
                extra_modules: list[nn.Module] | None = None) -> TrainSetup:
    """What the trainer saves with every checkpoint, and the run's signature for ``--resume``."""
    return TrainSetup(
        out_dir=Path(out),
        train=train,
        checkpoint_base={"kind": kind, "arch": arch, "label_map": label_map, "task": task, "config": config,
                         "inputs": inputs, "meta": meta},
        signature=signature,
        extra_modules=list(extra_modules or []),
        log_name=log_name,
        run_dir=run_dir,
    )


def fit(model: nn.Module, loss_fn: LossFn, train_set, collate_fn, setup: TrainSetup, dist: DistInfo,
        evaluate: EvalFn | None, resume: bool) -> dict:
    """Train: the :class:`Trainer`'s summary ``{"best", "last", "train_seconds"}``."""
    return Trainer(model, loss_fn, train_set, collate_fn, setup, dist, evaluate=evaluate).fit(resume=resume)


__all__ = ["fit", "input_hashes", "load_backbone", "run_folder", "seed_model", "start_distributed", "summary",
           "train_setup", "validator"]
