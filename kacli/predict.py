"""Run a kacli model on image files: boxes as JSON, and PNGs with the boxes drawn.

``predict_images`` writes, atomically (the folder appears complete or not at all):

- ``OUT/predictions.json``: ``{image path as given: [{"box": [x0, y0, x1, y1] (pixels of the
  original image, clipped to it), "score", "category_id", "name"}, ...]}``, best first, only
  detections with ``score >= threshold``;
  with ``fmt="coco"`` it is instead a COCO results file (:mod:`kacli.eval.results`):
  ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``, the best 100 detections
  of each image scoring at least ``threshold``, image ids from ``image_ids`` (a COCO json, matched
  by file name) or the image's numeric file name (two images with one id are refused), boxes
  unclipped as ``kacli eval`` writes them;
- ``OUT/<image stem>.png`` per image (``_2``, ``_3``… appended on name clashes) with the boxes
  drawn and labelled ``"<name> <score>"``.

Each image goes through the evaluation transform (shorter side → ``size``, longer side ≤
``max_size``; defaults: the checkpoint's ``config.aug.eval_size`` / ``max_size``, else 800 / 1333:
:func:`kacli.eval.infer.eval_sizes`), the path ``kacli eval`` takes (:mod:`kacli.eval.infer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from kacli.data.images import load_image
from kacli.draw import draw_detections
from kacli.errors import KacliError
from kacli.eval.infer import detect_image, eval_sizes
from kacli.eval.results import image_id_for, image_ids_by_name, write_results
from kacli.fsutil import atomic_dir, load_json
from kacli.limits import check_side
from kacli.teachers.hf import build_detector, load_detector, match_categories
from kacli.progress import make_progress
from kacli.runtime import pick_device

FORMATS = ("kacli", "coco")
MAX_PER_IMAGE = 100  # COCO's maxDets: what pycocotools and leaderboards read per image


def _png_names(images: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for p in images:
        stem = p.stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        names.append(f"{stem}.png" if n == 1 else f"{stem}_{n}.png")
    return names


def _check_distinct_ids(paths: Sequence[Path], coco_ids: Sequence[int], from_file: bool) -> None:
    """Two images given one image id (``a/000001.png`` and ``b/000001.png``, or one file given
    twice) would have their detections merged into one image by whoever reads the results file:
    refused, naming both files. (An id is the image's id in its dataset, so none is made up.)"""
    first: dict[int, Path] = {}
    for p, i in zip(paths, coco_ids):
        if i in first:
            how = ("the --image-ids file matches both to it by file name" if from_file
                   else "give --image-ids COCO.json to map each file to its id")
            raise KacliError(f"image id {i} is also that of {first[i]}: a COCO results file would merge their "
                             f"detections; {how}", p)
        first[i] = p


def predict_images(
    ckpt_path: str | Path,
    images: Sequence[str | Path],
    size: int | None,
    max_size: int | None,
    threshold: float,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    force: bool = False,
    fmt: str = "kacli",
    image_ids: str | Path | None = None,
) -> dict[str, Any]:
    """Predict on ``images`` with the checkpoint at ``ckpt_path`` (teacher, raw or student).

    Returns ``{"predictions": {path: [...]}, "pngs": {path: png path}, "size", "max_size",
    "threshold", "out"}``. Raises KacliError — before anything is written — for a missing or
    unreadable image, an unreadable checkpoint, a threshold outside [0, 1], an unknown ``fmt``, or
    (``fmt="coco"``) an image whose id cannot be found.
    """

    if not images:
        raise KacliError("no images given")
    if not 0.0 <= threshold <= 1.0:
        raise KacliError(f"threshold must be in [0, 1], got {threshold}")
    if fmt not in FORMATS:
        raise KacliError(f"unknown --format {fmt!r} (use {' or '.join(FORMATS)})")
    check_side("--size", size)
    check_side("--max-size", max_size)
    paths = [Path(p) for p in images]
    coco_ids: list[int] = []
    ids_json = load_json(image_ids) if fmt == "coco" and image_ids is not None else None
    if fmt == "coco":
        lookup = image_ids_by_name(ids_json, image_ids) if ids_json is not None else None
        coco_ids = [image_id_for(p, lookup) for p in paths]
        _check_distinct_ids(paths, coco_ids, lookup is not None)
    decoded = [load_image(p) for p in paths]  # every image checked before any work
    ckpt = load_detector(ckpt_path)  # a kacli checkpoint, or a transformers folder (kacli.teachers.hf)
    if ckpt["kind"] == "transformers" and fmt == "coco":
        # its classes are slot numbers, not category ids: named as the --image-ids file's categories
        categories = ids_json.get("categories") if isinstance(ids_json, dict) else None
        if not isinstance(categories, list) or not categories:
            raise KacliError("--format coco with a transformers folder needs --image-ids COCO.json with its "
                             "categories (the folder's classes are matched to them by name)", ckpt["path"])
        ckpt = match_categories(ckpt, {int(c["id"]): str(c["name"]) for c in categories
                                       if isinstance(c, dict) and "id" in c and "name" in c})
    size, max_size = eval_sizes(ckpt, size, max_size)
    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    model = build_detector(ckpt).to(dev).eval()
    ids, names = ckpt["label_map"]["ids"], ckpt["label_map"]["names"]
    model_name = Path(ckpt["path"]).stem if ckpt.get("task") is None else str(ckpt["task"])
    if ckpt["kind"] == "transformers" and model_name in ("best", "last"):  # a run's best/ or last/ folder
        model_name = f"{Path(ckpt['path']).parent.name}/{model_name}"

    predictions: dict[str, list[dict]] = {}
    results: list[dict] = []
    pngs: dict[str, str] = {}
    out = Path(out_dir)
    with atomic_dir(out, force=force) as tmp, make_progress(unit="img", transient=True) as prog:
        task = prog.add_task("predict", total=len(paths), info="")
        for k, (p, image, png) in enumerate(zip(paths, decoded, _png_names(paths))):
            det = detect_image(model, image, size, max_size, dev)
            keep = (det["scores"] >= threshold).nonzero().flatten()
            keep = keep[det["scores"][keep].argsort(descending=True)]
            rows = [
                {
                    "box": [float(v) for v in det["boxes"][i].tolist()],
                    "score": float(det["scores"][i]),
                    "category_id": int(ids[int(det["labels"][i])]),
                    "name": str(names[int(det["labels"][i])]),
                }
                for i in keep.tolist()
            ]
            predictions[str(p)] = rows
            if fmt == "coco":
                for i, r in zip(keep.tolist()[:MAX_PER_IMAGE], rows):
                    x0, y0, x1, y1 = det["unclipped"][i].tolist()
                    results.append({"image_id": coco_ids[k], "category_id": r["category_id"],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": r["score"]})
            drawn = draw_detections(
                image,
                [{
                    "boxes": [r["box"] for r in rows],
                    "labels": [r["name"] for r in rows],
                    "scores": [r["score"] for r in rows],
                    "name": model_name,
                }],
            )  # fmt: skip
            drawn.save(tmp / png, format="PNG")
            pngs[str(p)] = str(out / png)
            prog.update(task, advance=1)
        if fmt == "coco":
            write_results(tmp / "predictions.json", results)
        else:
            with open(tmp / "predictions.json", "w", encoding="utf-8") as f:
                json.dump(predictions, f, indent=2)
                f.write("\n")
    return {
        "predictions": predictions,
        "results": results,
        "format": fmt,
        "pngs": pngs,
        "size": size,
        "max_size": max_size,
        "threshold": threshold,
        "out": str(out),
    }
