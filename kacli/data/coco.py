"""Validate and normalise a COCO detection dict.

Every reader (COCO json, VOC, YOLO) ends here, so the rest of kacli sees one shape:

- ``images``: ``{id, file_name, width, height}``; ``file_name`` is relative to the image root and
  may not escape it;
- ``annotations``: ``{id, image_id, category_id, bbox, area, iscrowd}`` (plus ``difficult: 1`` for
  VOC difficult objects), ``bbox`` pixel ``[x, y, w, h]``, ids positive (pycocotools treats an
  annotation id of 0 as "unmatched");
- ``categories``: ``{id, name, supercategory}`` sorted by id.

Boxes that leave the image are clipped to it; boxes with no area left (zero or negative size,
not finite, or wholly outside) are dropped. Both are counted in the returned :class:`BoxReport`,
never done silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from kacli.errors import KacliError
from kacli.fsutil import safe_join


@dataclass
class BoxReport:
    """What normalisation changed: boxes dropped (by reason) and boxes clipped to the image."""

    degenerate: int = 0  # zero/negative width or height, or not finite
    outside_image: int = 0  # no area left inside the image
    clipped: int = 0  # partly outside the image, clipped to it
    examples: list[str] = field(default_factory=list)  # a few "<image file>: <box>" for messages

    @property
    def dropped(self) -> int:
        return self.degenerate + self.outside_image

    def as_dict(self) -> dict:
        return {"degenerate": self.degenerate, "outside_image": self.outside_image, "clipped": self.clipped}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _require_list(d: dict, key: str, source) -> list:
    v = d.get(key)
    if not isinstance(v, list):
        raise KacliError(f"not a COCO detection file: {key!r} must be a list", source)
    return v


def normalize_categories(cats: list, source) -> list[dict]:
    """Check ids (unique ints) and names (unique, non-empty); return them sorted by id."""
    out, ids, names = [], set(), set()
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise KacliError(f"category #{i} has no integer 'id'", source)
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise KacliError(f"category {c['id']} has no name", source)
        if c["id"] in ids:
            raise KacliError(f"category id {c['id']} appears twice", source)
        if name in names:
            raise KacliError(f"category name {name!r} appears twice", source)
        ids.add(c["id"])
        names.add(name)
        sc = c.get("supercategory")
        out.append({"id": c["id"], "name": name, "supercategory": sc if isinstance(sc, str) else ""})
    if not out:
        raise KacliError("the dataset has no categories", source)
    return sorted(out, key=lambda c: c["id"])


def clip_box(bbox, width: float, height: float) -> tuple[list[float] | None, str]:
    """Clip a pixel ``[x, y, w, h]`` box to the image.

    Returns ``(box, status)``; status is ``"ok"``, ``"clipped"``, ``"degenerate"`` (no positive
    size to begin with) or ``"outside"`` (nothing left inside the image); box is None when dropped.
    """
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None, "degenerate"
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return None, "outside"
    if (x1, y1, x2, y2) == (x, y, x + w, y + h):
        return [x, y, w, h], "ok"
    return [x1, y1, x2 - x1, y2 - y1], "clipped"


def normalize_coco(
    data,
    source: str | Path,
    image_root: str | Path | None = None,
) -> tuple[dict, BoxReport]:
    """Validate a COCO detection dict and return ``(normalised dict, BoxReport)``.

    Args:
        data: the parsed COCO dict.
        source: the file the dict came from; every error names it.
        image_root: when given, each ``file_name`` must stay inside it (``fsutil.safe_join``).

    Raises:
        KacliError: structure errors, duplicate ids, an annotation naming an unknown image or
            category, or an image path escaping ``image_root``.
    """
    if not isinstance(data, dict):
        raise KacliError("not a COCO detection file: the top level must be an object", source)
    images_in = _require_list(data, "images", source)
    anns_in = _require_list(data, "annotations", source)
    categories = normalize_categories(_require_list(data, "categories", source), source)
    cat_ids = {c["id"] for c in categories}

    images: list[dict] = []
    by_id: dict[int, dict] = {}
    for i, im in enumerate(images_in):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise KacliError(f"image #{i} has no integer 'id'", source)
        fn = im.get("file_name")
        if not isinstance(fn, str) or not fn:
            raise KacliError(f"image {im['id']} has no 'file_name'", source)
        w, h = im.get("width"), im.get("height")
        if not (_is_num(w) and _is_num(h) and w > 0 and h > 0):
            raise KacliError(f"image {im['id']} ({fn}) has no positive 'width' and 'height'", source)
        if im["id"] in by_id:
            raise KacliError(f"image id {im['id']} appears twice", source)
        if image_root is not None:
            safe_join(image_root, fn, source=source)
        rec = {"id": im["id"], "file_name": fn.replace("\\", "/"), "width": int(w), "height": int(h)}
        by_id[im["id"]] = rec
        images.append(rec)

    report = BoxReport()
    anns: list[dict] = []
    ann_ids = []
    for i, a in enumerate(anns_in):
        if not isinstance(a, dict):
            raise KacliError(f"annotation #{i} is not an object", source)
        aid = a.get("id", f"#{i}")
        if a.get("image_id") not in by_id or not _is_int(a.get("image_id")):
            raise KacliError(f"annotation {aid} points at unknown image id {a.get('image_id')!r}", source)
        if a.get("category_id") not in cat_ids or not _is_int(a.get("category_id")):
            raise KacliError(f"annotation {aid} points at unknown category id {a.get('category_id')!r}", source)
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
            raise KacliError(f"annotation {aid} has no 'bbox' of 4 numbers", source)
        im = by_id[a["image_id"]]
        box, status = clip_box(bbox, im["width"], im["height"])
        if box is None:
            if status == "degenerate":
                report.degenerate += 1
            else:
                report.outside_image += 1
            if len(report.examples) < 3:
                report.examples.append(f"{im['file_name']}: {bbox}")
            continue
        if status == "clipped":
            report.clipped += 1
        area = a.get("area")
        box_area = box[2] * box[3]
        area = float(area) if _is_num(area) and area > 0 and math.isfinite(area) else box_area
        if status == "clipped":
            area = min(area, box_area)
        rec = {
            "id": a.get("id"),
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": box,
            "area": area,
            "iscrowd": 1 if a.get("iscrowd") else 0,
        }
        if a.get("difficult"):
            rec["difficult"] = 1
        ann_ids.append(rec["id"])
        anns.append(rec)

    # Keep the dataset's annotation ids when they are usable; otherwise number them 1..M.
    if not all(_is_int(v) and v > 0 for v in ann_ids) or len(set(ann_ids)) != len(ann_ids):
        for k, rec in enumerate(anns, 1):
            rec["id"] = k

    out = {"images": images, "annotations": anns, "categories": categories}
    if isinstance(data.get("info"), dict):
        out["info"] = dict(data["info"])
    return out, report


def annotation_counts(coco: dict) -> dict[int, int]:
    """Number of annotations per category id (every category listed, zeros included)."""
    counts = {c["id"]: 0 for c in coco["categories"]}
    for a in coco["annotations"]:
        counts[a["category_id"]] += 1
    return counts


def subset(coco: dict, category_ids, categories: list[dict] | None = None) -> dict:
    """The dataset restricted to ``category_ids``: every image kept, other categories'
    annotations dropped. The category list is ``categories`` (default: the dataset's own)
    restricted to ``category_ids``."""
    keep = set(category_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    out["images"] = coco["images"]
    out["annotations"] = [a for a in coco["annotations"] if a["category_id"] in keep]
    out["categories"] = [dict(c) for c in (coco["categories"] if categories is None else categories) if c["id"] in keep]
    return out


def count_summary(coco: dict) -> dict:
    """``{images, images_with_objects, annotations}`` of a COCO dict."""
    with_obj = {a["image_id"] for a in coco["annotations"]}
    return {"images": len(coco["images"]), "images_with_objects": len(with_obj), "annotations": len(coco["annotations"])}
