"""What a DETR training run reads from ``--config``: :class:`DetrRunConfig` (model, aug, train),
its presets and its loader.

``train-teacher`` trains with it, ``cache-teachers`` takes its ``aug`` section from a
``--config``, and ``amalgamate`` accepts its presets as a ``--config`` and starts from the
teachers' recorded settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kacli.config import apply_overrides, load_config
from kacli.data.transforms import AUG_PRESETS, AugConfig
from kacli.engine.config import TrainConfig
from kacli.models.config import PRESETS as MODEL_PRESETS
from kacli.models.config import ModelConfig


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
# Conditional DETR-R50 (arXiv 2108.06152): its paper's 50-epoch schedule, learning rate dropped at 40.
RUN_PRESETS["conditional-r50"] = DetrRunConfig(
    model=MODEL_PRESETS["conditional-r50"], aug=AUG_PRESETS["detr"], train=TrainConfig(epochs=50, lr_drop=40))
# The tiny preset with Conditional DETR's decoder and classifier (the same data, schedule and sizes).
RUN_PRESETS["tiny-conditional"] = dataclasses.replace(RUN_PRESETS["tiny"], model=MODEL_PRESETS["tiny-conditional"])


def load_run_config(source: str | Path | None, overrides: dict[str, Any]) -> DetrRunConfig:
    """``--config`` (a YAML file or a preset name; default ``detr-r50``) plus command-line overrides."""
    cfg = load_config(source if source is not None else "detr-r50", DetrRunConfig, RUN_PRESETS)
    cfg = apply_overrides(cfg, overrides)
    cfg.model.validate(source)
    return cfg


__all__ = ["DetrRunConfig", "RUN_PRESETS", "load_run_config"]
