"""Tiny datasets written by the data-stage tests: COCO json, PASCAL VOC and YOLO folders."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

VOC_NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow "
    "diningtable dog horse motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def write_image(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 100, 110)).save(path)
    return path


def write_coco(
    path: Path,
    images: list[tuple[str, int, int]],
    anns: list[tuple[int, int, list[float]]],
    categories: list[tuple[int, str, str]],
    image_root: Path | None = None,
) -> Path:
    """``images`` = [(file_name, w, h)] (ids 1..n), ``anns`` = [(image id, category id, xywh)],
    ``categories`` = [(id, name, supercategory)]. Image files are written under ``image_root``
    (default: the json's folder)."""
    root = image_root or path.parent
    for fn, w, h in images:
        if not fn.startswith(".."):
            write_image(root / fn, w, h)
    d = {
        "images": [{"id": i, "file_name": fn, "width": w, "height": h} for i, (fn, w, h) in enumerate(images, 1)],
        "annotations": [
            {"id": k, "image_id": im, "category_id": c, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, c, b) in enumerate(anns, 1)
        ],
        "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in categories],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return path


def voc_xml(filename: str, w: int, h: int, objects: list[tuple[str, list[float], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return (
        f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def write_voc(
    root: Path,
    items: dict[str, tuple[int, int, list[tuple[str, list[float], int]]]],
    splits: dict[str, list[str]],
) -> Path:
    """``items`` = {stem: (w, h, [(name, [xmin, ymin, xmax, ymax], difficult)])}; ``splits`` = {split: [stems]}."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for stem, (w, h, objs) in items.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", w, h)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", w, h, objs))
    for split, stems in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
    return root


def write_yolo_from_coco(root: Path, coco_by_split: dict[str, dict], layout: str, names_as: str) -> Path:
    """Write normalised COCO dicts (as :func:`kacli.data.readers.read_source` gives them, with
    category ids 1..K) as a YOLO dataset.

    layout ``images-split``: ``images/<split>`` + ``labels/<split>``, yaml ``train: images/train``;
    layout ``split-images``: ``<split>/images`` + ``<split>/labels``, yaml ``train: ../train/images``
    (off by one ``../``, as exporters write it). ``names_as``: ``list`` or ``dict``.
    """
    cats = next(iter(coco_by_split.values()))["categories"]
    names = [c["name"] for c in cats]
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    cfg: dict = {}
    for split, coco in coco_by_split.items():
        if layout == "images-split":
            img_dir, lab_dir, entry = root / "images" / split, root / "labels" / split, f"images/{split}"
        else:
            img_dir, lab_dir, entry = root / split / "images", root / split / "labels", f"../{split}/images"
        cfg[split] = entry
        for im in coco["images"]:
            stem = Path(im["file_name"]).stem
            write_image(img_dir / f"{stem}.png", im["width"], im["height"])
            lines = []
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    W, H = im["width"], im["height"]
                    lines.append(f"{a['category_id'] - 1} {(x + w / 2) / W!r} {(y + h / 2) / H!r} {w / W!r} {h / H!r}")
            lab_dir.mkdir(parents=True, exist_ok=True)
            if lines:
                (lab_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    cfg["nc"] = len(names)
    cfg["names"] = names if names_as == "list" else {i: n for i, n in enumerate(names)}
    (root / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def boxes_by_name(coco: dict) -> list[tuple[str, str, tuple[float, ...]]]:
    """[(image stem, category name, bbox)] sorted: a dataset's boxes independent of ids and file layout."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    stems = {im["id"]: Path(im["file_name"]).stem for im in coco["images"]}
    return sorted((stems[a["image_id"]], names[a["category_id"]], tuple(a["bbox"])) for a in coco["annotations"])
