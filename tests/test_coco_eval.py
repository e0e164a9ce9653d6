"""pycocotools metrics on hand-built cases: perfect, perturbed by a known IoU, per task, ensembles."""

from __future__ import annotations

import contextlib
import io

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kacli.errors import KacliError
from kacli.eval.coco_eval import coco_metrics, pool_detections

TASKS = {"t1": [1, 2], "t2": [3]}


def make_gt() -> dict:
    """3 images, 3 categories, 40×40 boxes only (all "medium": no small or large objects)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2, 3)]
    boxes = [
        (1, 1, [10, 10, 40, 40]),
        (1, 3, [100, 100, 40, 40]),
        (2, 1, [50, 20, 40, 40]),
        (2, 2, [120, 30, 40, 40]),
        (3, 2, [20, 120, 40, 40]),
        (3, 3, [140, 140, 40, 40]),
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": 1600.0, "iscrowd": 0}
        for k, (i, c, b) in enumerate(boxes)
    ]
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "star"}]
    return {"images": images, "annotations": anns, "categories": cats}


def perfect(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
        for a in gt["annotations"]
    ]


def shift_category(dets: list[dict], cat: int, dx: float) -> list[dict]:
    out = []
    for d in dets:
        d = dict(d, bbox=list(d["bbox"]))
        if d["category_id"] == cat:
            d["bbox"][0] += dx
        out.append(d)
    return out


def test_detections_equal_to_ground_truth_give_ap_one(capsys):
    gt = make_gt()
    m = coco_metrics(gt, perfect(gt), tasks=TASKS)
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are silenced
    for k in ("AP", "AP50", "AP75", "APm"):
        assert m[k] == pytest.approx(1.0)
    # No small or large objects: pycocotools' -1 becomes None.
    assert m["APs"] is None and m["APl"] is None
    assert m["images"] == 3
    assert m["per_task"]["t1"]["AP"] == pytest.approx(1.0)
    assert m["per_task"]["t2"]["AP"] == pytest.approx(1.0)
    assert m["per_category"][3] == {"name": "star", "AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}


def test_perturbed_boxes_give_hand_computed_ap():
    """Shifting a 40-px box by 8 px gives IoU 32/48 = 0.667: a match at IoU thresholds
    0.50..0.65 (4 of 10), a miss at 0.70..0.95, so that category's AP is 0.4 exactly."""
    gt = make_gt()
    m = coco_metrics(gt, shift_category(perfect(gt), cat=3, dx=8), tasks=TASKS)
    assert m["per_category"][3]["AP"] == pytest.approx(0.4)
    assert m["per_category"][3]["AP50"] == pytest.approx(1.0)
    assert m["per_category"][1]["AP"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx((1 + 1 + 0.4) / 3)
    assert m["AP"] < 1.0
    assert m["AP75"] == pytest.approx(2 / 3)  # star misses at 0.75
    # Per task: t1's categories are untouched, t2's are not.
    assert m["per_task"]["t1"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}
    assert m["per_task"]["t2"] == {"AP": pytest.approx(0.4), "AP50": pytest.approx(1.0), "AP75": pytest.approx(0.0)}


def test_per_task_equals_cocoeval_restricted_to_the_task():
    """The per-task numbers equal a separate COCOeval run with params.catIds = the task's ids."""
    gt = make_gt()
    dets = shift_category(shift_category(perfect(gt), cat=3, dx=8), cat=1, dx=5)
    dets.append({"image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.95})  # a false positive
    m = coco_metrics(gt, dets, tasks=TASKS)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = make_gt()
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        for name, ids in TASKS.items():
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.catIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert m["per_task"][name]["AP"] == pytest.approx(ev.stats[0])
            assert m["per_task"][name]["AP50"] == pytest.approx(ev.stats[1])
            assert m["per_task"][name]["AP75"] == pytest.approx(ev.stats[2])
    assert m["per_task"]["t1"]["AP"] < 1.0


def test_false_positive_ranked_first_costs_what_the_pr_curve_says():
    """Category 2 has 2 objects; one unmatched detection scored above both gives precision
    1/2 then 2/3, interpolated to 2/3 at every recall: AP = 2/3."""
    gt = make_gt()
    dets = perfect(gt) + [{"image_id": 1, "category_id": 2, "bbox": [150, 5, 30, 30], "score": 0.99}]
    m = coco_metrics(gt, dets)
    assert m["per_category"][2]["AP"] == pytest.approx(2 / 3)
    # The same detection ranked below the true ones changes nothing.
    dets[-1]["score"] = 0.1
    assert coco_metrics(gt, dets)["per_category"][2]["AP"] == pytest.approx(1.0)


def test_category_ids_restrict_the_evaluation():
    gt = make_gt()
    dets = shift_category(perfect(gt), cat=3, dx=8)
    m = coco_metrics(gt, dets, tasks=TASKS, category_ids=[1, 2, 99])
    assert sorted(m["per_category"]) == [1, 2]
    assert m["AP"] == pytest.approx(1.0)
    assert m["per_task"]["t2"] == {"AP": None, "AP50": None, "AP75": None}
    with pytest.raises(KacliError, match="none of the model's categories"):
        coco_metrics(gt, dets, category_ids=[42])


def test_empty_detections_give_zeros():
    gt = make_gt()
    m = coco_metrics(gt, [], tasks=TASKS)
    assert (m["AP"], m["AP50"], m["AP75"], m["APm"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["per_task"]["t1"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert m["per_category"][1]["AP"] == 0.0


def test_ground_truth_without_area_or_iscrowd_is_filled_in():
    gt = make_gt()
    for a in gt["annotations"]:
        del a["area"], a["iscrowd"], a["id"]
    assert coco_metrics(gt, perfect(gt))["AP"] == pytest.approx(1.0)


def test_detection_for_unknown_image_is_an_error():
    gt = make_gt()
    with pytest.raises(KacliError, match="image id 7"):
        coco_metrics(gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])


def test_pool_detections_keeps_the_best_per_image():
    a = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": s / 1000} for s in range(0, 160, 2)]
    b = [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": s / 1000} for s in range(1, 160, 2)]
    b += [{"image_id": 2, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 0.5}] * 3
    pooled = pool_detections([a, b])
    img1 = [d for d in pooled if d["image_id"] == 1]
    assert len(img1) == 100
    # The 160 scores are 0.000 .. 0.159; the best 100 are 0.059 .. 0.159, in descending order.
    assert [round(d["score"] * 1000) for d in img1] == list(range(159, 59, -1))
    assert {d["category_id"] for d in img1} == {1, 5}
    assert len([d for d in pooled if d["image_id"] == 2]) == 3
    assert len(pool_detections([a, b], max_per_image=10)) == 10 + 3
    assert a[0]["score"] == 0.0  # inputs untouched
