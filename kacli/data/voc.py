"""PASCAL VOC reader: ``ROOT/Annotations/*.xml``, ``ROOT/JPEGImages``, ``ROOT/ImageSets/Main/<split>.txt``.

Boxes: VOC's ``xmin ymin xmax ymax`` become COCO ``[xmin, ymin, xmax - xmin, ymax - ymin]`` (so a box
with ``xmin == xmax`` has no width and is dropped as degenerate). ``difficult`` objects are kept with
``iscrowd: 1`` and ``difficult: 1``: pycocotools then ignores them in evaluation, as the VOC protocol
does, and training drops them.

Category ids: when every object name in ``Annotations/`` is one of the 20 VOC classes, the classes get
their standard ids 1..20 (alphabetical order, :data:`VOC_CLASSES`); otherwise the names found in the
whole ``Annotations/`` folder, sorted, get ids 1..K. Either way every split of one root gets the same ids.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kacli.data.coco import BoxReport, normalize_coco
from kacli.data.images import image_size
from kacli.errors import KacliError
from kacli.fsutil import combined_sha256, require_dir

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise KacliError(f"malformed XML: {e}", path) from None
    except FileNotFoundError:
        raise KacliError("annotation file not found", path) from None


def _text(el: ET.Element, tag: str, path: Path, required: bool = True) -> str | None:
    node = el.find(tag)
    if node is None or node.text is None or not node.text.strip():
        if required:
            raise KacliError(f"missing <{tag}>", path)
        return None
    return node.text.strip()


def _number(el: ET.Element, tag: str, path: Path) -> float:
    s = _text(el, tag, path)
    try:
        return float(s)
    except ValueError:
        raise KacliError(f"<{tag}> is not a number: {s!r}", path) from None


def parse_annotation(path: Path) -> dict:
    """One VOC XML → ``{filename, width, height, objects: [{name, difficult, box xyxy}]}``
    (width/height 0 when the file does not give them)."""
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise KacliError(f"not a VOC annotation: root element is <{root.tag}>", path)
    size = root.find("size")
    w = h = 0
    if size is not None:
        try:
            w = int(float(_text(size, "width", path, required=False) or 0))
            h = int(float(_text(size, "height", path, required=False) or 0))
        except ValueError:
            raise KacliError("<size> is not a number", path) from None
    objects = []
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        bb = obj.find("bndbox")
        if bb is None:
            raise KacliError(f"object {name!r} has no <bndbox>", path)
        box = [_number(bb, k, path) for k in ("xmin", "ymin", "xmax", "ymax")]
        diff = _text(obj, "difficult", path, required=False)
        objects.append({"name": name, "difficult": diff not in (None, "0"), "box": box})
    return {"filename": _text(root, "filename", path, required=False), "width": w, "height": h, "objects": objects}


def category_names(ann_dir: Path, parsed: dict[Path, dict]) -> list[dict]:
    """Categories of a VOC root: standard VOC ids when all names are VOC's, else sorted names → 1..K.
    ``parsed`` holds already-parsed files; the rest of ``Annotations/`` is parsed for names only."""
    names = set()
    for xml in sorted(ann_dir.glob("*.xml")):
        rec = parsed.get(xml) or parse_annotation(xml)
        names.update(o["name"] for o in rec["objects"])
    if not names:
        raise KacliError("no objects in any annotation file", ann_dir)
    if names <= set(VOC_CLASSES):
        order = list(VOC_CLASSES)
    else:
        order = sorted(names)
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(order, 1)]


def _split_ids(root: Path, split: str | None, ann_dir: Path) -> tuple[list[str], Path | None]:
    if split is None:
        return [p.stem for p in sorted(ann_dir.glob("*.xml"))], None
    f = root / "ImageSets" / "Main" / f"{split}.txt"
    if not f.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise KacliError(f"split file not found (splits here: {', '.join(have) or 'none'})", f)
    ids = [ln.split()[0] for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    bad = next((i for i in ids if "/" in i or "\\" in i or i.startswith(".")), None)
    if bad is not None:
        raise KacliError(f"image id {bad!r} is not a plain file name (it would leave Annotations/)", f)
    if len(set(ids)) != len(ids):
        raise KacliError("an image id is listed twice", f)
    if not ids:
        raise KacliError("split file lists no images", f)
    return ids, f


def _image_file(img_dir: Path, stem: str, filename: str | None, xml: Path) -> str:
    for cand in [stem + ".jpg", filename] + [stem + e for e in IMAGE_EXTS]:
        if cand and (img_dir / cand).is_file():
            return cand
    raise KacliError(f"image {stem!r} not found in {img_dir}", xml)


def read_voc(root: Path, split: str | None) -> tuple[dict, BoxReport, dict]:
    """A VOC root (and split) → (normalised COCO dict, box report, source fields)."""
    ann_dir = require_dir(root / "Annotations", "Annotations folder")
    img_dir = require_dir(root / "JPEGImages", "JPEGImages folder")
    stems, split_file = _split_ids(root, split, ann_dir)
    parsed: dict[Path, dict] = {}
    for stem in stems:
        xml = ann_dir / f"{stem}.xml"
        parsed[xml] = parse_annotation(xml)
    categories = category_names(ann_dir, parsed)
    cat_id = {c["name"]: c["id"] for c in categories}

    images, anns = [], []
    for img_id, stem in enumerate(stems, 1):
        xml = ann_dir / f"{stem}.xml"
        rec = parsed[xml]
        fn = _image_file(img_dir, stem, rec["filename"], xml)
        w, h = rec["width"], rec["height"]
        if w <= 0 or h <= 0:
            h, w = image_size(img_dir / fn)
        images.append({"id": img_id, "file_name": fn, "width": w, "height": h})
        for o in rec["objects"]:
            x1, y1, x2, y2 = o["box"]
            a = {
                "id": len(anns) + 1,
                "image_id": img_id,
                "category_id": cat_id[o["name"]],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": int(o["difficult"]),
            }
            if o["difficult"]:
                a["difficult"] = 1
            anns.append(a)

    coco, report = normalize_coco({"images": images, "annotations": anns, "categories": categories}, root, img_dir)
    hashed = [ann_dir / f"{s}.xml" for s in stems] + ([split_file] if split_file else [])
    src = {"path": str(root.resolve()), "sha256": combined_sha256(hashed, root), "image_root": str(img_dir.resolve())}
    return coco, report, src
