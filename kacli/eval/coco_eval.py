"""COCO-style bbox metrics with pycocotools, per category and per task, and the teachers' ensemble.

Ground truth is a COCO dict (``images``, ``annotations``, ``categories``); detections are a list of
``{"image_id", "category_id", "bbox": [x, y, w, h] (pixels), "score"}`` with the dataset's own
category ids. Both are turned into pycocotools ``COCO`` objects in memory (no temporary files) and
pycocotools' console output is silenced.

Metrics are fractions in [0, 1]. pycocotools reports -1 where a metric has no ground truth at all
(e.g. APs on a dataset without small objects); that becomes ``None`` here.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kacli.errors import KacliError

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress on stdout; keep it off the user's terminal."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _ground_truth(gt: Mapping) -> dict:
    """A copy of ``gt`` with the fields pycocotools needs (``id``, ``area``, ``iscrowd``) filled in."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise KacliError(f"ground truth is not a COCO dict: no {key!r} list")
    anns = []
    for i, a in enumerate(gt["annotations"]):
        a = dict(a)
        x, y, w, h = a["bbox"]
        a.setdefault("id", i + 1)
        a.setdefault("area", float(w) * float(h))
        a.setdefault("iscrowd", 0)
        anns.append(a)
    return {"images": list(gt["images"]), "annotations": anns, "categories": list(gt["categories"])}


def _detections(gt: dict, detections: Sequence[Mapping]) -> dict:
    """The detection list as a COCO dict (what ``COCO.loadRes`` builds, but also for an empty list)."""
    image_ids = {im["id"] for im in gt["images"]}
    anns = []
    for i, d in enumerate(detections):
        if d["image_id"] not in image_ids:
            raise KacliError(f"detection for image id {d['image_id']!r}, which is not in the ground truth")
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append(
            {
                "id": i + 1,
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "bbox": [x, y, w, h],
                "area": w * h,
                "score": float(d["score"]),
                "iscrowd": 0,
            }
        )
    return {"images": gt["images"], "annotations": anns, "categories": gt["categories"]}


def _none_if_missing(v: float) -> float | None:
    return None if v < 0 else float(v)


def _mean_valid(p: np.ndarray) -> float | None:
    """Mean of a pycocotools precision slice over its valid (> -1) entries, as ``summarize`` does."""
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else None


def coco_metrics(
    gt: Mapping,
    detections: Sequence[Mapping],
    tasks: Mapping[str, Iterable[int]] | None = None,
    category_ids: Iterable[int] | None = None,
) -> dict:
    """pycocotools bbox evaluation.

    Args:
        gt: COCO dict (``images``, ``annotations`` with pixel ``bbox`` [x, y, w, h], ``categories``).
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
        tasks: task name → its category ids; each task's AP is computed over its categories only.
        category_ids: evaluate only these categories (a model's label map ∩ the dataset's);
            default: every category of ``gt``.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"`` (fractions, ``None`` where there is no
        ground truth), ``"per_category": {cat_id: {"name", "AP", "AP50"}}``,
        ``"per_task": {name: {"AP", "AP50", "AP75"}}``, ``"images": n}``.

    A task's AP is the mean over its categories of the per-category precision that COCOeval
    accumulates with ``useCats=1``; that equals running COCOeval with ``params.catIds`` restricted
    to the task (categories are evaluated independently), without evaluating every image again.
    """
    gt_d = _ground_truth(gt)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt_d["categories"]}
    cats = sorted(names) if category_ids is None else sorted(set(category_ids) & set(names))
    if not cats:
        raise KacliError("none of the model's categories is in the dataset")
    n_images = len(gt_d["images"])

    coco_gt = _coco_from_dict(gt_d)
    coco_dt = _coco_from_dict(_detections(gt_d, detections))
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.catIds = cats
    ev.params.imgIds = sorted(coco_gt.getImgIds())
    with _quiet():
        if n_images:
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    if not n_images:
        stats = [-1.0] * len(SUMMARY_KEYS)
        precision = np.full((10, 101, len(cats), 4, 3), -1.0)
    else:
        stats = ev.stats
        precision = ev.eval["precision"]  # (T iou thresholds, R recall, K cats, A areas, M maxDets)

    # Index 0 of the IoU axis is 0.50, index 5 is 0.75; area 0 = all; the last maxDets = 100.
    def summary(k_idx: list[int]) -> dict:
        p = precision[:, :, k_idx, 0, -1]
        return {"AP": _mean_valid(p), "AP50": _mean_valid(p[0]), "AP75": _mean_valid(p[5])}

    result: dict = {key: _none_if_missing(stats[i]) for i, key in enumerate(SUMMARY_KEYS)}
    result["per_category"] = {}
    for k, cid in enumerate(cats):
        s = summary([k])
        result["per_category"][cid] = {"name": names[cid], "AP": s["AP"], "AP50": s["AP50"]}
    result["per_task"] = {}
    index = {cid: k for k, cid in enumerate(cats)}
    for name, ids in (tasks or {}).items():
        k_idx = sorted(index[c] for c in set(ids) if c in index)
        result["per_task"][name] = summary(k_idx) if k_idx else {"AP": None, "AP50": None, "AP75": None}
    result["images"] = n_images
    return result


def pool_detections(per_model: Sequence[Sequence[Mapping]], max_per_image: int = 100) -> list[dict]:
    """The teachers' ensemble: every model's detections (already in the dataset's category ids)
    pooled per image, keeping the ``max_per_image`` highest scores of each image.

    Returns a new list ordered by image id (in first-seen order) and descending score.
    """
    by_image: dict = defaultdict(list)
    for dets in per_model:
        for d in dets:
            by_image[d["image_id"]].append(d)
    pooled: list[dict] = []
    for dets in by_image.values():
        dets = sorted(dets, key=lambda d: -float(d["score"]))  # stable: ties keep model order
        pooled.extend(dict(d) for d in dets[:max_per_image])
    return pooled
