"""Run models over a split and score them with pycocotools: one model, or several as an ensemble.

Detections are mapped from each model's class indices to the dataset's category ids through
the model's label map, so teachers with different label spaces pool into one list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.data.transforms import AugConfig
from kacli.errors import KacliError
from kacli.eval.by_source import UNION, source_metrics, sources_of
from kacli.eval.coco_eval import coco_metrics, pool_detections
from kacli.eval.flops import count_parameters, gflops
from kacli.eval.infer import detect_batch, eval_sizes
from kacli.eval.results import check_results_target, write_results
from kacli.fsutil import load_json
from kacli.limits import check_positive, check_side
from kacli.progress import make_progress
from kacli.teachers.hf import build_detector, load_detector, match_categories
from kacli.runtime import pick_device


@torch.inference_mode()
def predict_detections(
    model: nn.Module,
    dataset: CocoDetection,
    label_ids: list[int],
    device: torch.device,
    batch_size: int = 8,
    workers: int = 0,
    max_per_image: int = 100,
    description: str = "predict",
    progress=None,
) -> list[dict]:
    """COCO detections ``{"image_id","category_id","bbox" (xywh px),"score"}`` of ``model`` on
    every image of ``dataset`` (evaluation views; boxes in the original image's pixels)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    dets: list[dict] = []
    own = progress is None
    prog = make_progress(unit="img", transient=True) if own else progress
    if own:
        prog.start()
    try:
        task = prog.add_task(description, total=len(dataset), info="")
        for images, mask, targets in loader:
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            for t, res in zip(targets, detect_batch(model, images.to(device), mask.to(device), sizes)):
                scores, labels, boxes = res["scores"].cpu(), res["labels"].cpu(), res["boxes"].cpu()
                order = scores.argsort(descending=True)[:max_per_image]
                for i in order.tolist():
                    x0, y0, x1, y1 = boxes[i].tolist()
                    dets.append(
                        {
                            "image_id": int(t["image_id"]),
                            "category_id": int(label_ids[int(labels[i])]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(scores[i]),
                        }
                    )
            prog.update(task, advance=len(targets))
        prog.remove_task(task)
    finally:
        if own:
            prog.stop()
    model.train(was_training)
    return dets


def check_label_map(label_map: dict, gt: dict, source: str | Path) -> None:
    """A model can be scored on a dataset only if all its categories are the dataset's."""
    have = {c["id"]: c["name"] for c in gt["categories"]}
    for cid, name in zip(label_map["ids"], label_map["names"]):
        if cid not in have:
            raise KacliError(f"model's category {cid} ({name}) is not in the dataset's categories", source)


def evaluate_detections(
    gt: dict, dets: list[dict], category_ids: list[int], tasks: dict[str, list[int]]
) -> dict[str, Any]:
    """pycocotools metrics over ``category_ids``, with per-task AP for the tasks whose categories
    the model covers.

    On a split of tasks from several datasets (``merge-tasks``: each image annotated only for its
    source's categories) a detection of a category nobody annotated on that image is neither right
    nor wrong, so the metrics are :func:`~kacli.eval.by_source.source_metrics`': ``AP``… and
    ``per_category`` are the union's (every category scored on the images annotated for it),
    ``per_task`` each task's source (its images, its categories) for the sources whose categories
    the model covers, and ``per_source`` every source's metrics (over the categories the model has)
    and the union's."""
    covered = set(category_ids)
    sources = sources_of(gt)
    if sources is None:
        tasks = {name: ids for name, ids in tasks.items() if set(ids) <= covered}
        return coco_metrics(gt, dets, tasks=tasks, category_ids=sorted(category_ids))
    groups = {name: (images, [c for c in cats if c in covered]) for name, (images, cats) in sources.items()}
    groups = {name: g for name, g in groups.items() if g[1]}
    if not groups:
        raise KacliError("none of the model's categories is annotated in any source of the dataset")
    per_source = source_metrics(gt, dets, groups)
    union = per_source[UNION]
    result = {k: v for k, v in union.items() if k not in ("categories",)}
    result["per_task"] = {name: {k: m[k] for k in ("AP", "AP50", "AP75")}
                          for name, m in per_source.items()
                          if name != UNION and name in tasks and set(sources[name][1]) <= covered}
    result["per_source"] = {name: {k: m[k] for k in ("AP", "AP50", "AP75", "images")} for name, m in per_source.items()}
    return result


def make_eval_dataset(json_path: Path, image_root: Path, label_ids: list[int], size: int, max_size: int) -> CocoDetection:
    aug = AugConfig(eval_size=size, max_size=max_size)
    return CocoDetection(json_path, image_root, label_ids, train=False, aug=aug)


def evaluate_model(
    model: nn.Module,
    label_map: dict,
    dataset: CocoDetection,
    gt: dict,
    tasks: dict[str, list[int]],
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Validation metrics of one model (used by the training engine every few epochs)."""
    dets = predict_detections(model, dataset, label_map["ids"], device, batch_size=batch_size, description="validate")
    return evaluate_detections(gt, dets, label_map["ids"], tasks)


def ensemble_detections(per_model: list[list[dict]], max_per_image: int = 100) -> list[dict]:
    return pool_detections(per_model, max_per_image=max_per_image)


def evaluate_checkpoints(
    models: list[str | Path],
    tasks_path: str | Path,
    split: str | None = "val",
    size: int | None = None,
    max_size: int | None = None,
    device_pref: str = "auto",
    batch_size: int = 8,
    detections_out: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``kacli eval``: score each checkpoint on ``split``; with several, also their ensemble
    (predictions mapped to dataset ids, pooled per image, best 100 kept). ``split`` None: the
    manifest's ``test`` split when it has one (nothing selects a checkpoint on it), else ``val``.

    Returns the ensemble's metrics (or the single model's) with ``members`` listing each model's.
    Params and GFLOPs are measured on one evaluation-sized input (multiply-adds, see flops.py).

    ``detections_out``: also write the scored detections (the ensemble's with several models) as
    a COCO results file (:mod:`kacli.eval.results`); checked before any work, replaced only with
    ``force``.
    """

    check_side("--size", size)
    check_side("--max-size", max_size)
    check_positive("--batch-size", batch_size)
    if detections_out is not None:
        check_results_target(detections_out, force)
    manifest = TaskManifest(tasks_path)
    if split is None:
        split = "test" if "test" in manifest.splits else "val"
    gt_path = manifest.split_json(split)
    gt = load_json(gt_path)
    root = manifest.image_root(split)
    tasks = {t.name: t.category_ids for t in manifest.tasks}
    device = pick_device(device_pref)
    # kacli checkpoints, or transformers folders (kacli.teachers.hf): their classes matched to the dataset's by name
    categories = {int(c["id"]): str(c["name"]) for c in gt["categories"]}
    ckpts = [match_categories(load_detector(m), categories, manifest.renames) for m in models]
    for ck in ckpts:
        check_label_map(ck["label_map"], gt, ck["path"])
    members, all_dets = [], []
    for ck in ckpts:
        s, ms = eval_sizes(ck, size, max_size)
        model = build_detector(ck).to(device).eval()
        dataset = make_eval_dataset(gt_path, root, ck["label_map"]["ids"], s, ms)
        if ck["kind"] == "transformers":  # the folder's name (with its parent's, for a run's best/ or last/)
            folder = Path(ck["path"])
            name = f"{folder.parent.name}/{folder.name}" if folder.name in ("best", "last") else folder.name
        else:
            name = ck.get("task") and f"teacher-{ck['task']}" or Path(ck["path"]).parent.name or Path(ck["path"]).stem
        dets = predict_detections(model, dataset, ck["label_map"]["ids"], device, batch_size=batch_size,
                                  description=f"eval {name}")
        metrics = evaluate_detections(gt, dets, ck["label_map"]["ids"], tasks)
        images, mask, _ = collate([dataset[0]])
        fl = gflops(model, (images.to(device), mask.to(device)))
        metrics.update(
            {
                "model": name,
                "checkpoint": ck["path"],
                "kind": ck["kind"],
                **({"family": ck["family"], "transformers_version": ck["transformers_version"]}
                   if ck["kind"] == "transformers" else {}),
                "method": (ck.get("meta") or {}).get("method"),
                "params": count_parameters(model),
                "gflops": fl["gflops_mac"],
                "flops_convention": fl["convention"],
                "input_size": list(images.shape[-2:]),
                "split": split,
                "train_seconds": (ck.get("meta") or {}).get("train_seconds"),
            }
        )
        members.append(metrics)
        all_dets.append(dets)
    if len(ckpts) == 1:
        result = dict(members[0])
        result["members"] = []
        if detections_out is not None:
            write_results(detections_out, all_dets[0], force)
        return result
    union = sorted({c for ck in ckpts for c in ck["label_map"]["ids"]})
    pooled = ensemble_detections(all_dets)
    result = evaluate_detections(gt, pooled, union, tasks)
    if detections_out is not None:
        write_results(detections_out, pooled, force)
    result.update(
        {
            "model": "ensemble",
            "params": sum(m["params"] for m in members),
            "gflops": sum(m["gflops"] for m in members),
            "flops_convention": members[0]["flops_convention"],
            "split": split,
            "train_seconds": None,
            "members": members,
        }
    )
    return result
