"""COCO results files: the detection list that pycocotools' ``COCO.loadRes`` and leaderboards read.

A results file is one JSON list, ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``,
boxes in the original image's pixels and ids the dataset's own (``kacli eval --detections``,
``kacli predict --format coco``). :func:`check_results_target` is called before any work so that
a bad target fails at once and nothing is written; :func:`write_results` writes atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from kacli.errors import KacliError
from kacli.fsutil import atomic_file, check_output_file


def check_results_target(path: str | Path, force: bool) -> Path:
    """Refuse a target whose folder does not exist, that is a folder, or that exists (unless ``force``)."""
    p = Path(path)
    parent = p.parent
    if not parent.exists():
        raise KacliError(f"folder {str(parent)!r} does not exist", p)
    if not parent.is_dir():
        raise KacliError(f"{str(parent)!r} is not a folder", p)
    return check_output_file(p, force)


def to_results(detections: Sequence[Mapping]) -> list[dict]:
    """Plain COCO results entries (ints, floats) in the order given."""
    return [
        {
            "image_id": int(d["image_id"]),
            "category_id": int(d["category_id"]),
            "bbox": [float(v) for v in d["bbox"]],
            "score": float(d["score"]),
        }
        for d in detections
    ]


def write_results(path: str | Path, detections: Sequence[Mapping], force: bool | None = None) -> Path:
    """Write ``detections`` as a COCO results file (one compact JSON list), atomically (``force``:
    as :func:`kacli.fsutil.atomic_file`'s, for a file the user named)."""
    p = Path(path)
    with atomic_file(p, encoding="utf-8", force=force) as f:
        json.dump(to_results(detections), f, separators=(",", ":"))
        f.write("\n")
    return p


def image_ids_by_name(gt: Mapping, source: str | Path) -> dict[str, int]:
    """A COCO dict's ``images[].file_name`` → ``id``, keyed by the file name and by its base name
    (a base name shared by two images is left out, so it cannot pick the wrong id)."""
    images = gt.get("images") if isinstance(gt, Mapping) else None
    if not isinstance(images, list):
        raise KacliError("not a COCO json: no 'images' list", source)
    out: dict[str, int] = {}
    base_count: dict[str, int] = {}
    for im in images:
        if not isinstance(im, Mapping) or "file_name" not in im or "id" not in im:
            raise KacliError("an image entry lacks 'file_name' or 'id'", source)
        out[str(im["file_name"])] = int(im["id"])
        base = Path(str(im["file_name"])).name
        base_count[base] = base_count.get(base, 0) + 1
    for im in images:
        base = Path(str(im["file_name"])).name
        if base_count[base] == 1:
            out.setdefault(base, int(im["id"]))
    return out


_DIGITS = re.compile(r"^\d+$")


def image_id_for(path: str | Path, ids: Mapping[str, int] | None) -> int:
    """The dataset id of an image file: looked up by its path as given, then by its name, in ``ids``
    (:func:`image_ids_by_name`); without ``ids``, the number its file name is (COCO's
    ``000000397133.jpg`` → 397133)."""
    p = Path(path)
    if ids is not None:
        for key in (str(path), p.as_posix(), p.name):
            if key in ids:
                return int(ids[key])
        raise KacliError("image is not in the --image-ids file (matched by file name)", p)
    if _DIGITS.match(p.stem):
        return int(p.stem)
    raise KacliError("file name is not a number: give --image-ids COCO.json to map names to image ids", p)
