"""YOLO reader: a root folder or its ``data.yaml``.

- ``names`` is a list (index → name) or a dict ``{index: name}``; category id = index + 1.
- Split folders are what the yaml's ``train`` / ``val`` / ``test`` entries name (a folder of images,
  a list of folders, or a ``.txt`` file listing image paths), resolved against the yaml's ``path``
  (when it exists) or the yaml's folder. Exporters often write paths off by one ``../``
  (``train: ../train/images`` beside ``train/``); such a path is retried without its leading ``../``.
- Without a yaml entry for the split, the layouts ``images/<split>`` + ``labels/<split>`` and
  ``<split>/images`` + ``<split>/labels`` are looked for.
- A label file is the image's path with its last ``images`` folder replaced by ``labels`` and the
  suffix by ``.txt``; no label file means no objects. Lines are ``class cx cy w h`` normalised to
  [0, 1] (or a polygon ``class x1 y1 x2 y2 ...``, whose bounding box is used).
- Image sizes are read from the files' headers with PIL (no pixel decoding).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from kacli.data.coco import BoxReport, normalize_coco
from kacli.data.images import image_size
from kacli.errors import KacliError
from kacli.fsutil import combined_sha256, load_yaml

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLIT_KEYS = ("train", "val", "test")
YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
ROUND = 4  # pixel decimals kept from normalised coordinates


def find_yaml(root: Path) -> Path | None:
    """The dataset yaml of a YOLO root: ``data.yaml`` (or ``dataset.yaml``), else the only yaml there."""
    for n in YAML_NAMES:
        if (root / n).is_file():
            return root / n
    ymls = sorted(p for p in root.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
    return ymls[0] if len(ymls) == 1 else None


def looks_like_yolo(root: Path) -> bool:
    if find_yaml(root) is not None or (root / "images").is_dir():
        return True
    return any((d / "images").is_dir() and (d / "labels").is_dir() for d in root.iterdir() if d.is_dir())


def parse_names(names, source: Path) -> list[tuple[int, str]]:
    """``names`` (list or dict) → sorted ``[(index, name)]``."""
    if isinstance(names, list):
        pairs = list(enumerate(names))
    elif isinstance(names, dict):
        pairs = []
        for k, v in names.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise KacliError(f"'names' key {k!r} is not a class index", source) from None
            if isinstance(k, bool) or idx < 0 or str(idx) != str(k).strip():
                raise KacliError(f"'names' key {k!r} is not a class index", source)
            pairs.append((idx, v))
        pairs.sort()
    else:
        raise KacliError("'names' must be a list or a mapping of class index to name", source)
    if not pairs:
        raise KacliError("'names' is empty", source)
    for idx, n in pairs:
        if not isinstance(n, (str, int)) or not str(n).strip():
            raise KacliError(f"class {idx} has no name", source)
    return [(i, str(n).strip()) for i, n in pairs]


def label_path(image: Path) -> Path:
    """YOLO's rule: the last ``images`` folder becomes ``labels``; the suffix becomes ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _resolve_entry(entry: str, bases: list[Path], source: Path) -> Path:
    """A yaml path entry, tried against each base as written and without one leading ``../``."""
    p = Path(entry)
    if p.is_absolute():
        if p.exists():
            return p
        raise KacliError(f"split path {entry!r} not found", source)
    tries = []
    for b in bases:
        tries.append(b / entry)
        if entry.startswith("../") or entry.startswith("..\\"):
            tries.append(b / entry[3:])
    for t in tries:
        if t.exists():
            return t
    raise KacliError(f"split path {entry!r} not found (tried {', '.join(str(t) for t in tries)})", source)


def _list_images(p: Path, source: Path) -> list[Path]:
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
    if p.suffix.lower() == ".txt":  # a list of image paths, relative to the list's folder
        out = []
        for ln in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if ln.strip():
                f = Path(ln.strip())
                f = f if f.is_absolute() else p.parent / f
                if not f.is_file():
                    raise KacliError(f"listed image {ln.strip()!r} not found", p)
                out.append(f)
        return out
    raise KacliError(f"split path {p} is neither a folder nor a .txt list of images", source)


def _layout_dir(base: Path, split: str) -> Path | None:
    for d in (base / "images" / split, base / split / "images"):
        if d.is_dir():
            return d
    return None


def _split_sources(base: Path, bases: list[Path], cfg: dict, split: str | None, source: Path) -> tuple[list[Path], str]:
    """The image folders / lists of one split, and the split's name."""
    entries = {k: cfg[k] for k in SPLIT_KEYS if cfg.get(k)}
    if split is None:
        if len(entries) == 1:
            split = next(iter(entries))
        elif not entries and (base / "images").is_dir() and not any(_layout_dir(base, s) for s in SPLIT_KEYS):
            return [base / "images"], "all"
        else:
            have = sorted(set(entries) | {s for s in SPLIT_KEYS if _layout_dir(base, s)})
            raise KacliError(f"name the split as PATH:SPLIT (splits here: {', '.join(have) or 'none'})", source)
    if split in entries:
        vals = entries[split] if isinstance(entries[split], list) else [entries[split]]
        if not all(isinstance(v, str) for v in vals):
            raise KacliError(f"'{split}' must be a path or a list of paths", source)
        return [_resolve_entry(v, bases, source) for v in vals], split
    d = _layout_dir(base, split)
    if d is None:
        have = sorted(set(entries) | {s for s in SPLIT_KEYS if _layout_dir(base, s)})
        raise KacliError(f"no split {split!r} (splits here: {', '.join(have) or 'none'})", source)
    return [d], split


def parse_label_file(path: Path, num_names: set[int]) -> list[tuple[int, list[float]]]:
    """``[(class index, [cx, cy, w, h] normalised)]`` of one label file."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KacliError("not a UTF-8 text file", path) from None
    for k, ln in enumerate(text.splitlines(), 1):
        vals = ln.split()
        if not vals:
            continue
        try:
            nums = [float(v) for v in vals]
        except ValueError:
            raise KacliError(f"line {k}: not numbers: {ln.strip()!r}", path) from None
        c = nums[0]
        if not math.isfinite(c) or c != int(c) or int(c) not in num_names:
            raise KacliError(f"line {k}: class {vals[0]} is not in the dataset's names", path)
        if len(nums) == 5:
            box = nums[1:]
        elif len(nums) >= 7 and len(nums) % 2 == 1:  # polygon: its bounding box
            xs, ys = nums[1::2], nums[2::2]
            box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        else:
            raise KacliError(f"line {k}: expected 'class cx cy w h', got {len(nums)} values", path)
        out.append((int(c), box))
    return out


def read_yolo(path: Path, split: str | None) -> tuple[dict, BoxReport, dict]:
    """A YOLO root or data.yaml (and split) → (normalised COCO dict, box report, source fields)."""
    if path.is_dir():
        root, yml = path, find_yaml(path)
    else:
        root, yml = path.parent, path
    cfg: dict = {}
    source = yml or root
    if yml is not None:
        cfg = load_yaml(yml)
        if not isinstance(cfg, dict):
            raise KacliError("not a YOLO dataset yaml: expected a mapping with 'names'", yml)
        if "names" not in cfg:
            raise KacliError("no 'names' in the dataset yaml", yml)
        names = parse_names(cfg["names"], yml)
        if isinstance(cfg.get("nc"), int) and cfg["nc"] != len(names):
            raise KacliError(f"'nc' is {cfg['nc']} but 'names' has {len(names)} entries", yml)
    else:
        cls_file = next((root / n for n in ("classes.txt", "obj.names") if (root / n).is_file()), None)
        if cls_file is None:
            raise KacliError("no data.yaml (or classes.txt) naming the classes", root)
        names = parse_names([ln.strip() for ln in cls_file.read_text().splitlines() if ln.strip()], cls_file)
        source = cls_file
    bases = [root]
    if isinstance(cfg.get("path"), str):
        p = Path(cfg["path"])
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            bases.insert(0, p)
    base = bases[0]
    srcs, split_name = _split_sources(base, bases, cfg, split, source)

    files: list[Path] = []
    for s in srcs:
        files.extend(_list_images(s, source))
    if not files:
        raise KacliError(f"split {split_name!r} has no images ({', '.join(str(s) for s in srcs)})", source)
    image_root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
    index = {i for i, _ in names}
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in names]

    images, anns, label_files = [], [], []
    for img_id, f in enumerate(files, 1):
        h, w = image_size(f)
        images.append({"id": img_id, "file_name": f.resolve().relative_to(image_root).as_posix(), "width": w, "height": h})
        lp = label_path(f)
        if not lp.is_file():
            continue
        label_files.append(lp)
        for c, (cx, cy, bw, bh) in parse_label_file(lp, index):
            x, y = round((cx - bw / 2) * w, ROUND), round((cy - bh / 2) * h, ROUND)
            bbox = [x, y, round(bw * w, ROUND), round(bh * h, ROUND)]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c + 1, "bbox": bbox, "iscrowd": 0})

    coco, report = normalize_coco({"images": images, "annotations": anns, "categories": categories}, source, image_root)
    hashed = label_files + ([yml] if yml else [])
    common = Path(os.path.commonpath([str(p.resolve()) for p in hashed] + [str(root.resolve())]))
    src = {
        "path": str(path.resolve()),
        "sha256": combined_sha256([p.resolve() for p in hashed], common),
        "image_root": str(image_root),
        "split_name": split_name,
    }
    return coco, report, src
