"""The trainer's settings: :class:`TrainConfig`, the ``train`` section of every training run's
configuration (``train-teacher``'s and ``amalgamate``'s)."""

from __future__ import annotations

import dataclasses

from kacli import limits
from kacli.config import ConfigValueError
from kacli.errors import KacliError
from kacli.engine import runlog


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by train-teacher and amalgamate.

    Attributes:
        epochs: number of passes over the training set.
        batch_size: images per step per process.
        lr, lr_backbone: AdamW learning rates of the transformer/heads and of the backbone.
        weight_decay: AdamW weight decay.
        lr_drop: the learning rate is multiplied by 0.1 every ``lr_drop`` epochs (StepLR).
        clip_max_norm: gradient clipping max norm (0 disables).
        seed: seed of the model init and of the augmentation.
        workers: DataLoader worker processes.
        eval_every: validate every this many epochs (0: never during training).
        checkpoint_every: also save ``last.pt`` every this many steps, for long epochs (0: at the
            end of each epoch only); ``--resume`` continues from the middle of the epoch.
        amp: mixed precision on CUDA (ignored on CPU).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (or ``cuda:N``).
        ema: decay in (0, 1) of an exponential moving average of the weights, updated every step;
            the average is validated and saved as the checkpoint's weights. None (default): off.
        tensorboard: write TensorBoard scalars (every loss term, the learning rate, the validation
            metrics) to ``<run>/tensorboard`` beside ``metrics.jsonl`` and ``metrics.csv``; needs
            the ``tensorboard`` extra.
    """

    epochs: int = 150
    batch_size: int = 8
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 100
    clip_max_norm: float = 0.1
    seed: int = 42
    workers: int = 2
    eval_every: int = 1
    checkpoint_every: int = 0
    amp: bool = True
    device: str = "auto"
    ema: float | None = None
    tensorboard: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "lr_drop"):
            if getattr(self, name) < 1:
                raise ConfigValueError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("workers", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigValueError(name, f"must not be negative, got {getattr(self, name)}")
        for name, var in (("epochs", "KACLI_MAX_EPOCHS"), ("workers", "KACLI_MAX_WORKERS")):
            try:
                limits.check_limit(name, getattr(self, name), var)
            except KacliError as e:
                raise ConfigValueError(name, e.message.removeprefix(f"{name} ")) from None
        try:
            limits.check_seed("seed", self.seed)
        except KacliError as e:
            raise ConfigValueError("seed", e.message.removeprefix("seed ")) from None
        for name in ("lr", "lr_backbone", "weight_decay", "clip_max_norm"):
            if getattr(self, name) < 0:
                raise ConfigValueError(name, f"must not be negative, got {getattr(self, name)}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigValueError("ema", f"must be in (0, 1) (a decay such as 0.9998), got {self.ema}")
        if self.tensorboard:
            if not runlog.tensorboard_available():
                raise ConfigValueError("tensorboard", "needs the tensorboard package (pip install 'kacli[tensorboard]')")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigValueError("device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


__all__ = ["TrainConfig"]
