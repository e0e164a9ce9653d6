"""COCO results files: ``kacli eval --detections`` and ``kacli predict --format coco`` write what
pycocotools' loadRes reads, in the dataset's own ids, and it scores exactly what eval printed."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import assert_one_line_error
from kacli.data.split import split_tasks
from kacli.models import DETR, ModelConfig
from kacli.models.checkpoint import save_checkpoint

CATS = [(3, "disc"), (7, "bar")]  # ids that are not class indices
CFG = ModelConfig(backbone="tiny", d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                  num_queries=4, dropout=0.0, pre_norm=True, tiny_widths=(8, 16, 16, 32))  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 noise images (ids 501.., one object each near the centre) as train and val, one task with
    both categories, and a DETR whose queries all box the centre with small image-dependent
    offsets and varied class scores: an AP strictly between 0 and 1."""
    d = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(8):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / name)
        images.append({"id": 501 + i, "file_name": name, "width": 64, "height": 64})
        box = [14.0 + 2 * (i % 3), 15.0 + (i % 4), 32.0 + (i % 2) * 4, 30.0 + (i % 3) * 2]
        anns.append({"id": i + 1, "image_id": 501 + i, "category_id": CATS[i % 2][0], "bbox": box,
                     "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in CATS]}  # fmt: skip
    (d / "gt.json").write_text(json.dumps(gt))
    (d / "scheme.yaml").write_text(yaml.safe_dump({"tasks": {"shapes": [n for _, n in CATS]}}))
    split_tasks(str(d / "gt.json"), str(d / "gt.json"), str(d / "scheme.yaml"), d / "tasks")

    torch.manual_seed(0)
    model = DETR(CFG, len(CATS)).eval()
    with torch.no_grad():
        model.bbox_embed.layers[2].weight.mul_(0.3)
        model.bbox_embed.layers[2].bias.zero_()  # sigmoid(0) = 0.5: centred boxes of half the image
        model.class_embed.weight.mul_(8)
    save_checkpoint(d / "m.pt", {"kind": "detr", "arch": CFG.to_dict(), "model": model.state_dict(),
                                 "label_map": {"ids": [c for c, _ in CATS], "names": [n for _, n in CATS]},
                                 "config": {"aug": {"eval_size": 64, "max_size": 96}}})  # fmt: skip
    return d


def pycocotools_ap(gt_path, results_path) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        dt = coco.loadRes(str(results_path))
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_eval_detections_score_what_eval_printed(setup, cli, tmp_path):
    d = setup
    det, ev = tmp_path / "det.json", tmp_path / "ev.json"
    r = cli("eval", "--model", d / "m.pt", "--tasks", d / "tasks", "--device", "cpu", "--batch-size", "1",
            "--json", ev, "--detections", det)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    metrics = json.loads(ev.read_text())
    results = json.loads(det.read_text())
    assert len(results) == 8 * CFG.num_queries  # every query of every image
    assert {x["image_id"] for x in results} == set(range(501, 509))
    assert {x["category_id"] for x in results} <= {3, 7}
    assert all(set(x) == {"image_id", "category_id", "bbox", "score"} and len(x["bbox"]) == 4 for x in results)
    ap = pycocotools_ap(d / "tasks" / "val" / "all.json", det)
    assert 0.05 < ap < 0.95, ap  # a real number, not a degenerate 0 or 1
    assert ap == pytest.approx(metrics["AP"], abs=1e-12)
    assert f"{100 * ap:.2f}" in r.stdout


def test_predict_coco_format_equals_eval_detections(setup, cli, tmp_path):
    d = setup
    det = tmp_path / "det.json"
    r = cli("eval", "--model", d / "m.pt", "--tasks", d / "tasks", "--device", "cpu", "--batch-size", "1",
            "--detections", det)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    imgs = [d / f"img{i}.png" for i in range(8)]
    r = cli("predict", "--model", d / "m.pt", *imgs, "--format", "coco", "--image-ids", d / "gt.json",
            "--device", "cpu", "--out", tmp_path / "pred")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    got = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    want = json.loads(det.read_text())

    def key(x):
        return (x["image_id"], -x["score"])

    got, want = sorted(got, key=key), sorted(want, key=key)
    assert len(got) == len(want) == 32  # threshold 0 by default in coco format
    assert [(x["image_id"], x["category_id"]) for x in got] == [(x["image_id"], x["category_id"]) for x in want]
    np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in want], atol=1e-5)
    np.testing.assert_allclose([x["bbox"] for x in got], [x["bbox"] for x in want], atol=1e-3)
    assert pycocotools_ap(d / "gt.json", tmp_path / "pred" / "predictions.json") == pytest.approx(
        pycocotools_ap(d / "gt.json", det), abs=1e-4
    )


def test_predict_coco_ids_from_numeric_file_names(setup, cli, tmp_path):
    d = setup
    img = tmp_path / "000000000042.png"
    img.write_bytes((d / "img0.png").read_bytes())
    r = cli("predict", "--model", d / "m.pt", img, "--format", "coco", "--threshold", "0.2",
            "--device", "cpu", "--out", tmp_path / "p")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert rows and {x["image_id"] for x in rows} == {42}
    assert all(x["score"] >= 0.2 for x in rows)


def test_results_bad_input(setup, cli, tmp_path):
    d = setup
    base = ["eval", "--model", d / "m.pt", "--tasks", d / "tasks", "--device", "cpu"]
    assert_one_line_error(cli(*base, "--detections", tmp_path / "nope" / "det.json"), "nope", "does not exist")
    assert not (tmp_path / "nope").exists()
    existing = tmp_path / "det.json"
    existing.write_text("keep")
    assert_one_line_error(cli(*base, "--detections", existing, "--json", tmp_path / "ev.json"), "det.json", "--force")
    assert existing.read_text() == "keep" and not (tmp_path / "ev.json").exists()
    r = cli(*base, "--detections", existing, "--force")
    assert r.exit_code == 0, r.stderr
    assert isinstance(json.loads(existing.read_text()), list)

    out = tmp_path / "pred"
    img = d / "img0.png"
    assert_one_line_error(cli("predict", "--model", d / "m.pt", img, "--format", "yolo", "--out", out), "yolo")
    assert_one_line_error(cli("predict", "--model", d / "m.pt", img, "--format", "coco", "--out", out),
                          "img0.png", "--image-ids")  # fmt: skip
    assert_one_line_error(cli("predict", "--model", d / "m.pt", img, "--format", "coco", "--out", out,
                              "--image-ids", d / "scheme.yaml"), "scheme.yaml")  # fmt: skip
    assert not out.exists()


def test_eval_reports_on_the_test_split_by_default_when_there_is_one(setup, cli, tmp_path):
    """eval without --split scores the test split (no run selects on it) where tasks.yaml has one,
    val where it has not; --split picks either."""
    d = setup
    gt = json.loads((d / "gt.json").read_text())
    keep = {im["id"] for im in gt["images"][:3]}
    test = {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    (tmp_path / "test.json").write_text(json.dumps(test))
    for im in test["images"]:
        (tmp_path / im["file_name"]).write_bytes((d / im["file_name"]).read_bytes())
    split_tasks(str(d / "gt.json"), str(d / "gt.json"), str(d / "scheme.yaml"), tmp_path / "tasks",
                test_spec=str(tmp_path / "test.json"))
    images = {}
    for name, extra in (("default", []), ("val", ["--split", "val"]), ("old", None)):
        tasks = d / "tasks" if extra is None else tmp_path / "tasks"
        out = tmp_path / f"{name}.json"
        r = cli("eval", "--model", d / "m.pt", "--tasks", tasks, "--device", "cpu", "--json", out, *(extra or []))
        assert r.exit_code == 0, r.stderr
        ev = json.loads(out.read_text())
        images[name] = (ev["split"], ev["images"])
        assert f"{ev['split']} split" in r.stdout
    assert images == {"default": ("test", 3), "val": ("val", 8), "old": ("val", 8)}
