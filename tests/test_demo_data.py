"""The demo dataset: deterministic bytes, counts, boxes inside images, the 2-task partition."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error
from PIL import Image

from kacli.data.demo_data import (
    CATEGORIES,
    MAX_SHAPES,
    MAX_SIZE,
    MIN_SIZE,
    _draw_shape,
    demo_partition,
    make_demo_data,
    render_image,
)
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    a = make_demo_data(tmp_path / "a", train_images=12, val_images=4, test_images=5, seed=3, progress=False)
    make_demo_data(tmp_path / "b", train_images=12, val_images=4, test_images=5, seed=3, progress=False)
    make_demo_data(tmp_path / "c", train_images=12, val_images=4, test_images=5, seed=4, progress=False)
    da, db, dc = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(da) == 12 + 4 + 5 + 4  # pngs, train.json, val.json, test.json, tasks-2.yaml
    assert da == db
    assert da["train.json"] != dc["train.json"] and da["images/train/000001.png"] != dc["images/train/000001.png"]
    # The three splits are different images: image 1 of each split differs from the others'.
    firsts = {da[f"images/{s}/000001.png"] for s in ("train", "val", "test")}
    assert len(firsts) == 3
    # Image i of a split depends on (seed, split, i) only: more images, or no test split, leave the
    # other images unchanged (a test split added later keeps train and val byte for byte).
    make_demo_data(tmp_path / "d", train_images=14, val_images=4, test_images=7, seed=3, progress=False)
    dd = digest(tmp_path / "d")
    assert all(dd[k] == v for k, v in da.items() if k.endswith(".png"))
    make_demo_data(tmp_path / "e", train_images=12, val_images=4, seed=3, progress=False)
    de = digest(tmp_path / "e")
    assert "test.json" not in de and not any(k.startswith("images/test/") for k in de)
    assert all(da[k] == v for k, v in de.items())
    assert (a["splits"]["train"]["images"], a["splits"]["test"]["images"]) == (12, 5)


def test_counts_boxes_and_pixels(tmp_path):
    s = make_demo_data(tmp_path / "demo", train_images=40, val_images=10, test_images=10, seed=0, progress=False)
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        d = json.loads((tmp_path / "demo" / f"{split}.json").read_text())
        assert d["categories"] == CATEGORIES
        assert [im["id"] for im in d["images"]] == list(range(1, n + 1))
        assert len(d["annotations"]) == s["splits"][split]["annotations"]
        per_image = np.bincount([a["image_id"] for a in d["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= MAX_SHAPES == 3
        for im in d["images"]:
            path = tmp_path / "demo" / "images" / im["file_name"]
            assert Image.open(path).size == (64, 64) and im["width"] == im["height"] == 64  # the default size
        boxes = {}
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            assert MIN_SIZE - 2 <= max(w, h) and min(w, h) >= MIN_SIZE - 2 and max(w, h) <= MAX_SIZE
            assert a["area"] == w * h and a["iscrowd"] == 0
            boxes.setdefault(a["image_id"], []).append((x, y, w, h))
        # Near-disjoint: two shapes' boxes share at most a sliver.
        for bs in boxes.values():
            for i, p in enumerate(bs):
                for q in bs[i + 1 :]:
                    ix = max(0, min(p[0] + p[2], q[0] + q[2]) - max(p[0], q[0]))
                    iy = max(0, min(p[1] + p[3], q[1] + q[3]) - max(p[1], q[1]))
                    assert ix * iy <= 0.1 * min(p[2] * p[3], q[2] * q[3])
    assert sum(s["per_category"].values()) == sum(s["splits"][k]["annotations"] for k in ("train", "val", "test"))


@pytest.mark.parametrize("w, h", [(12, 12), (30, 26), (48, 48)])
def test_shapes_fill_their_box_and_differ(w, h):
    masks = {c["name"]: _draw_shape(c["name"], w, h)[1:-1, 1:-1] for c in CATEGORIES}
    for name, m in masks.items():
        assert m.shape == (h, w)
        # Every border line of the box touches the shape: the box is the shape's tight box.
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), name
    centre = {n: bool(m[h // 2, w // 2]) for n, m in masks.items()}
    assert {n for n, v in centre.items() if not v} == {"ring", "frame"}  # the two hollow shapes
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (masks[a] != masks[b]).sum() >= 0.08 * w * h, (a, b)  # no two shapes alike


def test_render_boxes_hold_shape_colour_on_a_plain_backdrop():
    pixels, objects = render_image(np.random.default_rng([0, 0, 5]))
    assert pixels.shape == (64, 64, 3) and 1 <= len(objects) <= 3
    outside = np.ones((64, 64), dtype=bool)
    for _cid, (x, y, w, h) in objects:
        inside = pixels[y : y + h, x : x + w].astype(float)
        # A shape's colour is ≥100 away from the backdrop, so its box varies strongly.
        assert np.linalg.norm(inside.reshape(-1, 3).std(axis=0)) > 20
        outside[y : y + h, x : x + w] = False
    # Outside the boxes: one grey (128 ± 10 per channel) with pixel noise of std 4.
    bg = pixels[outside].astype(float)
    assert np.all(np.abs(np.median(bg, axis=0) - 128) <= 10.5)
    assert np.all(np.abs(bg.std(axis=0) - 4) < 0.5)


def test_demo_partition_and_tasks_yaml(tmp_path):
    part = demo_partition()
    assert list(part) == ["convex", "concave"]
    assert [len(v) for v in part.values()] == [4, 4]
    assert sorted(part["convex"] + part["concave"]) == sorted(c["name"] for c in CATEGORIES)
    make_demo_data(tmp_path / "demo", train_images=6, val_images=2, progress=False)
    assert yaml.safe_load((tmp_path / "demo" / "tasks-2.yaml").read_text()) == {"tasks": part}
    # The demo's own pipeline: split by tasks-2.yaml; balanced:2 spreads the supercategories 2+2.
    demo = tmp_path / "demo"
    split_tasks(demo / "train.json", demo / "val.json", str(demo / "tasks-2.yaml"), tmp_path / "t2")
    m = TaskManifest(tmp_path / "t2")
    assert {t.name: t.category_names for t in m.tasks} == part
    assert m.image_root("train") == (demo / "images").resolve()
    man = split_tasks(demo / "train.json", None, "balanced:2", tmp_path / "b2")
    sc = {c["id"]: c["supercategory"] for c in CATEGORIES}
    for t in man["tasks"]:
        assert sorted(sc[i] for i in t["category_ids"]) == ["concave", "concave", "convex", "convex"]


def test_cli(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("make-demo-data", "--out", out, "--train-images", 5, "--val-images", 2, "--seed", 1)
    assert r.exit_code == 0, r.stderr
    assert "train" in r.stdout and (out / "train.json").is_file() and len(list((out / "images" / "val").iterdir())) == 2
    # the command writes a test split by default: 500 images, reported on, selected on by nothing
    assert len(json.loads((out / "test.json").read_text())["images"]) == 500
    assert len(list((out / "images" / "test").iterdir())) == 500
    assert_one_line_error(cli("make-demo-data", "--out", out, "--train-images", 5), str(out), "--force")
    assert_one_line_error(cli("make-demo-data", "--out", tmp_path / "x", "--size", 48), "--size must be at least")
    assert cli("make-demo-data", "--out", out, "--train-images", 3, "--val-images", 1, "--test-images", 2,
               "--force").exit_code == 0
    assert len(json.loads((out / "test.json").read_text())["images"]) == 2
    assert len(json.loads((out / "train.json").read_text())["images"]) == 3
