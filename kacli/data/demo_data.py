"""The demo dataset: synthetic shapes in COCO format, generated deterministically in seconds.

Each image (``size`` × ``size`` px, 64 by default) shows 1–3 filled shapes of 8 categories, in random
colours that stand out from the background, 16–30 px across, near-disjoint, on a plain mid-grey
backdrop (a slight random tint per image) with pixel noise. The categories split into two
supercategories of four, ``convex`` (circle, square, triangle, diamond) and ``concave`` (cross, ring,
star, frame), which is also the demo's 2-task partition (:func:`demo_partition`, written as
``tasks-2.yaml``). Shapes differ in outline and topology (holes, arms, points), so a small CNN
separates them; boxes are the tight bounding boxes of the drawn pixels.

The design is chosen for how fast a DETR learns it from scratch on a CPU (docs/DEMO.md): small
images (few tokens, cheap steps), few large objects, and a backdrop of one colour, so that "an
object is here" is a colour test the first convolution learns at once and training time goes to
telling the shapes apart. A textured backdrop of random colour made the same model need several
times more steps.

Layout written under ``DIR``: ``images/{train,val,test}/NNNNNN.png``, ``train.json``, ``val.json`` and
``test.json`` (``file_name`` relative to ``DIR/images``), ``tasks-2.yaml``. Runs select their checkpoint
on ``val``; ``test`` is the split results are reported on, which no selection looks at. The same seed
gives byte-identical files; image ``i`` of a split depends only on ``(seed, split, i)``, so adding a
split or changing another split's size leaves a split's images as they were.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from kacli.errors import KacliError
from kacli.fsutil import atomic_dir
from kacli.limits import check_seed
from kacli.progress import make_progress

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "convex"},
    {"id": 2, "name": "square", "supercategory": "convex"},
    {"id": 3, "name": "triangle", "supercategory": "convex"},
    {"id": 4, "name": "cross", "supercategory": "concave"},
    {"id": 5, "name": "ring", "supercategory": "concave"},
    {"id": 6, "name": "diamond", "supercategory": "convex"},
    {"id": 7, "name": "star", "supercategory": "concave"},
    {"id": 8, "name": "frame", "supercategory": "concave"},
]
MIN_SIZE, MAX_SIZE = 16, 30  # shape extent in pixels
MAX_SHAPES = 3
DEFAULT_SIZE = 64  # image side in pixels
BACKGROUND = 128.0  # mid-grey backdrop, tinted by up to ±TINT per channel
TINT = 10.0
NOISE = 4.0  # standard deviation of the pixel noise
MIN_CONTRAST = 100.0  # least RGB distance of a shape's colour from the backdrop
MAX_OVERLAP = 0.05  # intersection / smaller box area allowed between two shapes' boxes
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def demo_partition() -> dict[str, list[str]]:
    """The demo's two tasks by category name: one per supercategory (4 + 4 categories)."""
    out: dict[str, list[str]] = {}
    for c in CATEGORIES:
        out.setdefault(c["supercategory"], []).append(c["name"])
    return out


def _draw_shape(name: str, w: int, h: int) -> np.ndarray:
    """Boolean mask (h+2, w+2) of one shape filling a w×h box (one pixel of margin all round)."""
    m = Image.new("L", (w + 2, h + 2), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = 1, 1, w, h  # inclusive pixel box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    t = max(2, round(0.22 * min(w, h)))  # wall thickness of ring and frame
    if name == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif name == "ring":
        d.ellipse([x0, y0, x1, y1], fill=255)
        d.ellipse([x0 + t, y0 + t, x1 - t, y1 - t], fill=0)
    elif name == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif name == "frame":
        d.rectangle([x0, y0, x1, y1], fill=255)
        d.rectangle([x0 + t, y0 + t, x1 - t, y1 - t], fill=0)
    elif name == "triangle":
        d.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=255)
    elif name == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif name == "cross":
        bw, bh = max(3, round(0.34 * w)), max(3, round(0.34 * h))
        d.rectangle([x0, round(cy - bh / 2), x1, round(cy + bh / 2)], fill=255)
        d.rectangle([round(cx - bw / 2), y0, round(cx + bw / 2), y1], fill=255)
    elif name == "star":
        unit = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
            for k, a in ((k, -math.pi / 2 + k * math.pi / 5) for k in range(10))
        ]  # five points, top one up; stretched below to fill the box
        ux, uy = [p[0] for p in unit], [p[1] for p in unit]
        sx, sy = (x1 - x0) / (max(ux) - min(ux)), (y1 - y0) / (max(uy) - min(uy))
        d.polygon([(x0 + (u - min(ux)) * sx, y0 + (v - min(uy)) * sy) for u, v in unit], fill=255)
    else:  # pragma: no cover - CATEGORIES is closed
        raise ValueError(name)
    return np.asarray(m) > 127


def _overlap(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1, min(a[2] * a[3], b[2] * b[3]))


def render_image(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image: ``(pixels (size, size, 3) uint8, [(category id, [x, y, w, h] pixels)])``."""
    base = BACKGROUND + rng.uniform(-TINT, TINT, 3)
    img = rng.standard_normal((size, size, 3), dtype=np.float32) * NOISE + base.astype(np.float32)

    n = int(rng.integers(1, MAX_SHAPES + 1))
    placed: list[list[int]] = []
    objects = []
    for _ in range(n):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        s = rng.uniform(MIN_SIZE, MAX_SIZE)
        ar = math.exp(rng.uniform(-0.15, 0.15))
        w = int(np.clip(round(s * ar), MIN_SIZE, min(MAX_SIZE, size)))
        h = int(np.clip(round(s / ar), MIN_SIZE, min(MAX_SIZE, size)))
        for _try in range(30):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if all(_overlap([x, y, w, h], p) <= MAX_OVERLAP for p in placed):
                break
        else:
            continue
        while True:  # a colour far from the background
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - base) >= MIN_CONTRAST:
                break
        mask = _draw_shape(cat["name"], w, h)[1:-1, 1:-1]
        region = img[y : y + h, x : x + w]
        region[mask] = colour
        ys, xs = np.nonzero(mask)
        box = [x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        placed.append([x, y, w, h])
        objects.append((cat["id"], box))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_demo_data(
    out: str | Path,
    train_images: int = 2000,
    val_images: int = 300,
    test_images: int = 0,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write the demo dataset under ``out`` (see the module docstring; ``test.json`` only when
    ``test_images`` > 0, as ``kacli make-demo-data`` asks by default); return a summary
    ``{out, seed, size, seconds, splits: {train: {images, annotations, json}, val: ..., test: ...},
    per_category}``."""
    if train_images < 1 or val_images < 0 or test_images < 0:
        raise KacliError("need at least 1 training image and 0 or more validation and test images", out)
    if size < 2 * MAX_SIZE:
        raise KacliError(f"--size must be at least {2 * MAX_SIZE} px to hold {MAX_SIZE}-px shapes", out)
    check_seed("--seed", seed)
    out = Path(out)
    t0 = time.perf_counter()
    # test.json only when asked for: a dataset without one is a dataset without a test split
    splits = {"train": train_images, "val": val_images} | ({"test": test_images} if test_images else {})
    summary: dict = {"out": str(out), "seed": seed, "size": size, "splits": {}, "per_category": {}}
    per_cat = {c["name"]: 0 for c in CATEGORIES}

    with atomic_dir(out, force=force) as tmp, make_progress("img", disable=not progress) as bar:
        job = bar.add_task("demo images", total=sum(splits.values()), info="")
        for split, count in splits.items():
            (tmp / "images" / split).mkdir(parents=True)
            images, anns = [], []
            for i in range(count):
                rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
                pixels, objects = render_image(rng, size)
                fn = f"{split}/{i + 1:06d}.png"
                (tmp / "images" / fn).write_bytes(_png_bytes(pixels))
                images.append({"id": i + 1, "file_name": fn, "width": size, "height": size})
                for cid, box in objects:
                    anns.append(
                        {"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0}
                    )  # fmt: skip
                    per_cat[CATEGORIES[cid - 1]["name"]] += 1
                bar.advance(job)
            coco = {
                "info": {"description": "kacli demo shapes", "seed": seed, "size": size, "split": split},
                "images": images,
                "annotations": anns,
                "categories": [dict(c) for c in CATEGORIES],
            }
            with open(tmp / f"{split}.json", "w", encoding="utf-8") as f:
                json.dump(coco, f)
                f.write("\n")
            summary["splits"][split] = {"images": count, "annotations": len(anns), "json": str(out / f"{split}.json")}
        with open(tmp / "tasks-2.yaml", "w", encoding="utf-8") as f:
            f.write("# The demo's two tasks (kacli split-tasks --scheme tasks-2.yaml)\n")
            yaml.safe_dump({"tasks": demo_partition()}, f, sort_keys=False)
    summary["per_category"] = per_cat
    summary["image_root"] = str(out / "images")
    summary["partition"] = str(out / "tasks-2.yaml")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
