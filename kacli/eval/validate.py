"""Validation during training (AP on the manifest's val split, per task), shared by
``train-teacher`` and ``amalgamate``."""

from __future__ import annotations

from kacli.data.manifest import TaskManifest
from kacli.data.transforms import AugConfig
from kacli.eval.evaluate import evaluate_model, make_eval_dataset
from kacli.fsutil import load_json


def make_validator(manifest: TaskManifest, label_map: dict, aug: AugConfig, device, batch_size: int):
    """Validation on the manifest's ``val`` split: AP over the model's categories, per-task AP."""
    gt_path = manifest.split_json("val")
    gt = load_json(gt_path)
    dataset = make_eval_dataset(gt_path, manifest.image_root("val"), label_map["ids"], aug.eval_size, aug.max_size)
    tasks = {t.name: t.category_ids for t in manifest.tasks}

    def evaluate(model):
        return evaluate_model(model, label_map, dataset, gt, tasks, device, batch_size=batch_size)

    return evaluate


__all__ = ["make_validator"]
