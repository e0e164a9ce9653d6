"""Read any supported dataset source into one normalised COCO dict.

A source is written ``PATH`` or ``PATH:SPLIT``:

- a COCO json file (one split by itself; images resolved against ``images`` or the json's folder,
  falling back to ``<json folder>/images``);
- a PASCAL VOC root (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<SPLIT>.txt``);
- a YOLO root or its ``data.yaml`` (``SPLIT`` is one of the yaml's ``train``/``val``/``test``).

The result is the dict of :func:`kacli.data.coco.normalize_coco` with ``info.source`` (spec,
format, path, split, sha256 of the annotation files, image_root) and ``info.boxes`` (the counts
of dropped and clipped boxes).
"""

from __future__ import annotations

from pathlib import Path

from kacli.data.coco import BoxReport, normalize_coco
from kacli.data.images import image_size
from kacli.data.voc import read_voc
from kacli.data.yolo import find_yaml, looks_like_yolo, read_yolo
from kacli.errors import KacliError
from kacli.fsutil import load_json, safe_join, sha256_file

FORMATS = ("coco", "voc", "yolo")


def parse_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``"PATH[:SPLIT]"`` → ``(Path, split or None)``. A path that exists as written wins."""
    s = str(spec)
    if Path(s).exists() or ":" not in s:
        return Path(s), None
    head, _, tail = s.rpartition(":")
    if not head or not tail or "/" in tail or "\\" in tail:
        return Path(s), None
    return Path(head), tail


def detect_format(path: Path) -> str:
    """``coco`` for a .json file, ``yolo`` for a .yaml file or a YOLO folder, ``voc`` for a
    folder with ``Annotations/``."""
    if not path.exists():
        raise KacliError("dataset not found", path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise KacliError("not a dataset: expected a COCO .json, a YOLO data.yaml, or a VOC/YOLO folder", path)
    if (path / "Annotations").is_dir():
        return "voc"
    jsons = sorted(p.name for p in path.glob("*.json"))
    if jsons and find_yaml(path) is None:
        raise KacliError(f"a folder: pass one of its COCO json files ({', '.join(jsons[:4])})", path)
    if looks_like_yolo(path):
        return "yolo"
    raise KacliError(
        "not a dataset folder: no Annotations/ (VOC) and no data.yaml or images/ + labels/ (YOLO)", path
    )


def check_images_exist(coco: dict, root: Path, source: str | Path) -> None:
    """Every image file must exist under ``root`` (a one-line error names the first missing one)."""
    missing = [im["file_name"] for im in coco["images"] if not (root / im["file_name"]).is_file()]
    if missing:
        raise KacliError(
            f"{len(missing)} of {len(coco['images'])} image files not found under {root} "
            f"(first: {missing[0]!r}); pass --images DIR",
            source,
        )


def _coco_image_root(data: dict, json_path: Path, images: str | Path | None) -> Path:
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise KacliError("image folder not found", root)
        return root.resolve()
    candidates = [json_path.parent, json_path.parent / "images"]
    first = next((im.get("file_name") for im in data.get("images") or [] if isinstance(im, dict)), None)
    if isinstance(first, str):
        for c in candidates:
            try:
                if (c / first).is_file():
                    return c.resolve()
            except OSError:
                pass
    return candidates[0].resolve()


def read_coco_json(path: Path, images: str | Path | None = None) -> tuple[dict, BoxReport, dict]:
    """A COCO json → (normalised dict, box report, source fields)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise KacliError("not a COCO detection file: the top level must be an object", path)
    root = _coco_image_root(data, path, images)
    # Fill in sizes that the json leaves out, from the image files.
    for im in data.get("images") or []:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and not (im.get("width") and im.get("height")):
            im["height"], im["width"] = image_size(safe_join(root, im["file_name"], source=path))
    coco, report = normalize_coco(data, path, image_root=root)
    check_images_exist(coco, root, path)
    return coco, report, {"path": str(path.resolve()), "sha256": sha256_file(path), "image_root": str(root)}


def read_source(spec: str | Path, images: str | Path | None = None) -> dict:
    """Read ``"PATH[:SPLIT]"`` (COCO json, VOC root, YOLO root or data.yaml) into a normalised
    COCO dict with ``info.source`` and ``info.boxes``; ``images`` is the image folder of a
    COCO json."""
    path, split = parse_spec(spec)
    fmt = detect_format(path)
    if fmt == "coco":
        if split is not None:
            raise KacliError(f"a COCO json is one split by itself; drop ':{split}'", path)
        coco, report, src = read_coco_json(path, images)
    else:
        if images is not None:
            raise KacliError("--images applies to COCO json sources only (VOC and YOLO name their image folders)", path)
        if fmt == "voc":
            coco, report, src = read_voc(path, split)
        else:
            coco, report, src = read_yolo(path, split)
    info = dict(coco.get("info") or {})
    info["source"] = {"spec": str(spec), "format": fmt, "split": split, **src}
    info["boxes"] = report.as_dict()
    if report.examples:
        info["boxes"]["examples"] = list(report.examples)
    coco["info"] = info
    return coco


def source_of(coco: dict) -> dict:
    """The ``info.source`` record of a dict made by :func:`read_source`."""
    return coco["info"]["source"]


def box_report_of(coco: dict) -> dict:
    """The ``info.boxes`` record (``degenerate``, ``outside_image``, ``clipped``)."""
    return coco["info"]["boxes"]


__all__ = [
    "FORMATS",
    "parse_spec",
    "detect_format",
    "read_source",
    "read_coco_json",
    "check_images_exist",
    "source_of",
    "box_report_of",
]
