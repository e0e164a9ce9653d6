"""Per-source COCO metrics against direct pycocotools runs on a tiny hand-built pair."""

from __future__ import annotations

import contextlib
import io

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kacli.errors import KacliError
from kacli.eval.by_source import source_metrics
from kacli.eval.evaluate import evaluate_detections
from kacli.eval.coco_eval import SUMMARY_KEYS

# Images 1, 2 come from a vehicle dataset (car 1, bus 2), images 3, 4 from an animal one (dog 3);
# cars are labelled by both (image 3 has a car annotated too).
GT = {
    "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)],
    "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 3, "category_id": 3, "bbox": [20, 20, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 5, "image_id": 4, "category_id": 3, "bbox": [5, 5, 50, 50], "area": 2500, "iscrowd": 0},
    ],
}
DETS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
    {"image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20], "score": 0.95},  # a dog nobody labelled on 1
    {"image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 30], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.3},  # a wrong car
    {"image_id": 3, "category_id": 3, "bbox": [20, 20, 40, 40], "score": 0.9},
    {"image_id": 3, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.6},
    {"image_id": 4, "category_id": 3, "bbox": [5, 5, 50, 50], "score": 0.85},
    {"image_id": 4, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.95},  # a wrong car, on an animal image
]
SOURCES = {"vehicles": ([1, 2], [1, 2]), "animals": ([3, 4], [3, 1])}


def _direct(image_ids, cat_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = GT
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in DETS])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (None if ev.stats[i] < 0 else ev.stats[i]) for i, k in enumerate(SUMMARY_KEYS)}


def test_each_source_equals_cocoeval_restricted_to_its_images_and_categories():
    got = source_metrics(GT, DETS, SOURCES)
    assert list(got) == ["vehicles", "animals", "union"]
    for name, (images, cats) in SOURCES.items():
        ref = _direct(images, cats)
        for key in SUMMARY_KEYS:
            assert got[name][key] == pytest.approx(ref[key], abs=1e-12), (name, key)
        assert got[name]["images"] == 2 and got[name]["categories"] == sorted(cats)
    # Hand values: vehicles: car's one box found first (the wrong car on 2 scores lower) and bus exact → 1;
    # animals: dogs exact → 1 (the unlabelled dog on image 1 is not theirs); car ranks FP .95 on 4,
    # then TP .6 on 3 → precision 1/2 at every recall → .5; mean .75.
    assert got["vehicles"]["AP"] == pytest.approx(1.0)
    assert got["animals"]["per_category"][1]["AP"] == pytest.approx(0.5)
    assert got["animals"]["AP"] == pytest.approx(0.75)


def test_union_scores_each_category_only_on_the_images_annotated_for_it():
    got = source_metrics(GT, DETS, SOURCES)["union"]
    # car: both sources → images 1-4 (direct COCOeval on car over all images); bus: images 1, 2;
    # dog: images 3, 4 — not image 1, where its 0.95 detection would rank first and halve its AP.
    # car over images 1-4 ranks FP .95 (image 4), TP .9, TP .6, FP .3 → precision 2/3 at every recall.
    assert got["per_category"][1]["AP"] == pytest.approx(2 / 3)
    assert got["per_category"][1]["AP"] == pytest.approx(_direct([1, 2, 3, 4], [1])["AP"], abs=1e-12)
    assert got["per_category"][2]["AP"] == pytest.approx(_direct([1, 2], [2])["AP"], abs=1e-12)
    assert got["per_category"][3]["AP"] == pytest.approx(1.0)
    assert got["AP"] == pytest.approx((2 / 3 + 1 + 1) / 3) and got["images"] == 4 and got["categories"] == [1, 2, 3]
    # Plain COCOeval over every image and category counts the unlabelled dog as a false positive:
    # ranks FP (recall 0), TP, TP → interpolated precision 2/3 everywhere for dog.
    naive = source_metrics(GT, DETS, {"all": ([1, 2, 3, 4], [1, 2, 3])})
    assert naive["all"]["per_category"][3]["AP"] == pytest.approx(2 / 3)
    direct = _direct([1, 2, 3, 4], [1, 2, 3])["AP"]
    assert naive["union"]["AP"] == pytest.approx(naive["all"]["AP"]) == pytest.approx(direct)


def test_bad_sources_are_named():
    with pytest.raises(KacliError, match="source 'x': image id 9"):
        source_metrics(GT, DETS, {"x": ([9], [1])})
    with pytest.raises(KacliError, match="source 'x': category id 7"):
        source_metrics(GT, DETS, {"x": ([1], [7])})
    with pytest.raises(KacliError, match="may not be called 'union'"):
        source_metrics(GT, DETS, {"union": ([1], [1])})
    empty = source_metrics(GT, DETS, {"none": ([], [1])})
    assert empty["none"]["AP"] is None and empty["union"]["images"] == 0


def test_per_task_on_a_merged_split_only_for_the_sources_the_model_covers():
    """A vehicles-only model on a merged split whose animal source also labels cars: the animals'
    row is scored on cars alone (per_source), but it is not the animals task's AP (per_task)."""
    merged = {**GT, "images": [{**im, "source": "vehicles" if im["id"] <= 2 else "animals"} for im in GT["images"]],
              "complete_category_ids": {name: cats for name, (_, cats) in SOURCES.items()}}
    tasks = {"vehicles": [1, 2], "animals": [3, 1]}
    vehicles_only = [d for d in DETS if d["category_id"] in (1, 2)]
    got = evaluate_detections(merged, vehicles_only, [1, 2], tasks)
    assert list(got["per_task"]) == ["vehicles"]
    assert set(got["per_source"]) == {"vehicles", "animals", "union"}
    assert got["per_task"]["vehicles"]["AP"] == pytest.approx(source_metrics(GT, DETS, {"v": SOURCES["vehicles"]})["v"]["AP"])
    everything = evaluate_detections(merged, DETS, [1, 2, 3], tasks)
    assert list(everything["per_task"]) == ["vehicles", "animals"]
