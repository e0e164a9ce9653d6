"""merge-tasks: tasks from several datasets, per-image complete categories, teachers matched by name.

Two tiny sources: a YOLO dataset labelling car, person, truck and a COCO json labelling Person and
dog; both have an image called img1.png. person is one class shared by both tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from conftest import assert_one_line_error
from dataset_builders import write_coco, write_yolo_from_coco
from kacli.cache import schema
from kacli.cache.reader import TeacherCache
from kacli.commands.data import merge_table
from kacli.config import config_to_dict
from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.data.merge import TaskSource, merge_tasks
from kacli.data.split import split_tasks
from kacli.data.transforms import AugConfig
from kacli.errors import KacliError
from kacli.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from kacli.models.config import model_config
from kacli.models.detr import DETR
from kacli.teachers.labels import match_classes, remap_logits

AUG = AugConfig(scales=(64,), max_size=128, crop_scales=(64,), crop_min=48, crop_max=64, flip_p=0.5, crop_p=0.0,
                eval_size=64)
ARCH = {"d_model": 32, "nheads": 2, "enc_layers": 2, "dec_layers": 1, "dim_feedforward": 64,
        "tiny_widths": [8, 8, 16, 16], "num_queries": 6}


def yolo_source(root: Path) -> Path:
    """car=1, person=2, truck=3; train: img1.png (car, person), b.png (truck); val: v.png (person)."""
    cats = [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(["car", "person", "truck"], 1)]
    train = {
        "images": [{"id": 1, "file_name": "img1.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 8]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 10, 20]},
                        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [8, 8, 32, 16]}],
        "categories": cats,
    }
    val = {"images": [{"id": 1, "file_name": "v.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [16, 16, 16, 32]}], "categories": cats}
    return write_yolo_from_coco(root, {"train": train, "val": val}, "images-split", "list")


def coco_source(root: Path) -> Path:
    """Person=1, dog=2; img1.png (Person, dog), c.png (dog)."""
    return write_coco(
        root / "train.json",
        [("img1.png", 48, 48), ("c.png", 64, 48)],
        [(1, 1, [2, 2, 10, 20]), (1, 2, [20, 20, 20, 12]), (2, 2, [0, 0, 30, 30])],
        [(1, "Person", "human"), (2, "dog", "animal")],
    )


@pytest.fixture
def sources(tmp_path):
    return yolo_source(tmp_path / "vehicles"), coco_source(tmp_path / "animals")


def merge_args(yolo, coco, out, *extra):
    return ["merge-tasks", "--task", f"vehicles={yolo}:train", "--val", f"vehicles={yolo}:val",
            "--task", f"animals={coco}", "--out", out, *extra]


def make_teacher(path: Path, label_map: dict, seed: int, unnamed_classes: int = 0) -> Path:
    cfg = model_config({"preset": "tiny", **ARCH})
    cfg.unnamed_classes = unnamed_classes  # as import-checkpoint sets it
    torch.manual_seed(seed)
    model = DETR(cfg, len(label_map["ids"]))
    save_checkpoint(path, {"kind": "detr", "arch": cfg.to_dict(), "label_map": label_map, "task": None,
                           "model": model.state_dict(), "config": {"aug": config_to_dict(AUG), "model": cfg.to_dict()}})
    return path


# -- the merged manifest ---------------------------------------------------------------------------


def test_merge_two_datasets_shares_person_and_records_complete_categories(sources, cli, tmp_path):
    yolo, coco = sources
    out = tmp_path / "tasks"
    res = cli(*merge_args(yolo, coco, out))
    assert res.exit_code == 0, res.stderr
    assert "shared: person (one class, labelled by vehicles, animals)" in res.stdout
    wide = Console(width=250, record=True)
    wide.print(merge_table(yaml.safe_load((out / "tasks.yaml").read_text()), [{"id": 2, "name": "person", "tasks": []}]))
    text = wide.export_text()
    assert "car, person*, truck" in text and "person*, dog" in text and f"train: {yolo}:train" in text
    m = TaskManifest(out)
    assert m.merged and m.data["format"] == "kacli-tasks/2" and m.task_names == ["vehicles", "animals"]
    # one class per name: COCO's "Person" is YOLO's "person"
    assert m.categories == [{"id": 1, "name": "car", "supercategory": ""}, {"id": 2, "name": "person", "supercategory": ""},
                            {"id": 3, "name": "truck", "supercategory": ""}, {"id": 4, "name": "dog", "supercategory": "animal"}]
    assert [(t.category_ids, t.category_names) for t in m.tasks] == [([1, 2, 3], ["car", "person", "truck"]),
                                                                      ([2, 4], ["person", "dog"])]
    assert m.student_label_map() == {"ids": [1, 2, 3, 4], "names": ["car", "person", "truck", "dog"]}
    recs = {(s["name"], s["split"]): s for s in m.source_records()}
    assert sorted(recs) == [("animals", "train"), ("vehicles", "train"), ("vehicles", "val")]
    assert recs[("vehicles", "train")]["complete_category_ids"] == [1, 2, 3]
    assert recs[("animals", "train")]["complete_category_ids"] == [2, 4]
    assert recs[("animals", "train")]["dataset"]["format"] == "coco" and recs[("vehicles", "val")]["images"] == 1

    all_json = json.loads(m.split_json("train").read_text())
    ims = all_json["images"]
    assert [(i["id"], i["source"], i["source_id"], i["source_file_name"]) for i in ims] == [
        (1, "vehicles", 1, "b.png"), (2, "vehicles", 2, "img1.png"), (3, "animals", 1, "img1.png"), (4, "animals", 2, "c.png")]
    # the two img1.png stay apart: each path is relative to the folder holding both sources
    assert m.image_root("train") == tmp_path
    assert [i["file_name"] for i in ims] == ["vehicles/images/train/b.png", "vehicles/images/train/img1.png",
                                             "animals/img1.png", "animals/c.png"]
    assert all_json["complete_category_ids"] == {"vehicles": [1, 2, 3], "animals": [2, 4]}
    anns = [(a["image_id"], a["category_id"], a["bbox"]) for a in all_json["annotations"]]
    assert anns == [(1, 3, [8.0, 8.0, 32.0, 16.0]), (2, 1, [4.0, 4.0, 16.0, 8.0]), (2, 2, [30.0, 10.0, 10.0, 20.0]),
                    (3, 2, [2, 2, 10, 20]), (3, 4, [20, 20, 20, 12]), (4, 4, [0, 0, 30, 30])]
    assert [a["id"] for a in all_json["annotations"]] == [1, 2, 3, 4, 5, 6]
    # each task's json: its own images only
    animals = json.loads(m.split_json("train", "animals").read_text())
    assert [i["id"] for i in animals["images"]] == [3, 4] and [c["id"] for c in animals["categories"]] == [2, 4]
    assert animals["complete_category_ids"] == {"animals": [2, 4]} and len(animals["annotations"]) == 3
    assert m.tasks[1].counts["train"] == {"images": 2, "images_with_objects": 2, "annotations": 3}
    # val: only vehicles has one; its json is complete for the vehicle categories
    val = json.loads(m.split_json("val").read_text())
    assert [i["source"] for i in val["images"]] == ["vehicles"] and m.tasks[1].counts["val"]["images"] == 0


def test_merge_with_a_test_source(sources, cli, tmp_path):
    """--test NAME=SRC: a third split, each source's images and categories as for val."""
    yolo, coco = sources
    out = tmp_path / "tasks"
    res = cli(*merge_args(yolo, coco, out, "--test", f"vehicles={yolo}:val", "--test", f"animals={coco}"))
    assert res.exit_code == 0, res.stderr
    m = TaskManifest(out)
    assert m.splits == ["train", "val", "test"]
    recs = {(s["name"], s["split"]): s for s in m.source_records()}
    assert recs[("vehicles", "test")]["complete_category_ids"] == [1, 2, 3]
    assert recs[("animals", "test")]["complete_category_ids"] == [2, 4]
    test = json.loads(m.split_json("test").read_text())
    assert [i["source"] for i in test["images"]] == ["vehicles", "animals", "animals"]
    assert [(a["image_id"], a["category_id"]) for a in test["annotations"]] == [(1, 2), (2, 2), (2, 4), (3, 4)]
    assert m.tasks[0].counts["test"]["annotations"] == 1 and m.tasks[1].counts["test"]["annotations"] == 3
    # --test of an unknown task, or twice for one task: one line, nothing written
    assert_one_line_error(cli(*merge_args(yolo, coco, tmp_path / "o", "--test", f"birds={coco}")), "no task 'birds'")
    assert_one_line_error(cli(*merge_args(yolo, coco, tmp_path / "o", "--test", f"animals={coco}",
                                          "--test", f"animals={coco}")), "names task 'animals' twice")
    assert not (tmp_path / "o").exists()


def test_dataset_complete_masks_follow_the_label_map(sources, tmp_path):
    yolo, coco = sources
    tasks_yaml = tmp_path / "tasks"
    merge_tasks([TaskSource("vehicles", train=f"{yolo}:train"), TaskSource("animals", train=str(coco))], tasks_yaml)
    m = TaskManifest(tasks_yaml)
    ds = CocoDetection(m.split_json("train"), m.image_root("train"), m.student_label_map()["ids"], train=False, aug=AUG)
    masks = [ds[i][1]["complete"].tolist() for i in range(4)]
    assert masks == [[True, True, True, False]] * 2 + [[False, True, False, True]] * 2
    _, target = ds[2]  # animals' img1.png: Person → class 1, dog → class 3
    assert target["labels"].tolist() == [1, 3] and target["complete"].dtype == torch.bool
    assert ds.image_path(2) == tmp_path / "animals" / "img1.png"
    # another label order (a teacher's): the mask follows it
    ds = CocoDetection(m.split_json("train"), m.image_root("train"), [4, 2], train=True, aug=AUG)
    assert [ds[i][1]["complete"].tolist() for i in range(4)] == [[False, True]] * 2 + [[True, True]] * 2
    # the task's own json: every image complete for every class of the task
    ds = CocoDetection(m.split_json("train", "animals"), m.image_root("train"), [2, 4], train=False, aug=AUG)
    assert [ds[i][1]["complete"].tolist() for i in range(2)] == [[True, True]] * 2
    # collate keeps the masks per image
    _, _, targets = collate([ds[0], ds[1]])
    assert [t["complete"].shape for t in targets] == [(2,), (2,)]


def test_single_dataset_manifest_reads_as_before_with_every_class_complete(sources, tmp_path):
    _, coco = sources
    scheme = tmp_path / "scheme.yaml"
    scheme.write_text("tasks: {people: [Person], pets: [dog]}\n")
    split_tasks(str(coco), None, str(scheme), tmp_path / "single")
    m = TaskManifest(tmp_path / "single")
    assert not m.merged and m.data["format"] == "kacli-tasks/1" and m.renames == {}
    assert m.student_label_map() == {"ids": m.category_ids, "names": m.category_names} == {"ids": [1, 2], "names": ["Person", "dog"]}
    assert [(s["name"], s["complete_category_ids"]) for s in m.source_records()] == [("train", [1, 2])]
    ds = CocoDetection(m.split_json("train"), m.image_root("train"), [1, 2], train=True, aug=AUG, generator_seed=3)
    img, target = ds[0]
    assert target["complete"].tolist() == [True, True]
    assert list(target) == ["boxes", "labels", "image_id", "orig_size", "size", "view", "complete"]
    # the views are the same as without the mask: same seed, same crops and flips
    ds2 = CocoDetection(m.split_json("train"), m.image_root("train"), [1, 2], train=True, aug=AUG, generator_seed=3)
    assert ds2.view_for(0, 48, 48) == ds.view_for(0, 48, 48) and torch.equal(ds2[0][0], img)


def test_categories_subset_and_rename(sources, cli, tmp_path):
    yolo, coco = sources
    out = tmp_path / "t"
    res = cli(*merge_args(yolo, coco, out, "--categories", "vehicles=Car, truck", "--rename", "DOG=hound", "--json"))
    assert res.exit_code == 0, res.stderr
    printed = json.loads(res.stdout)
    m = TaskManifest(out)
    assert m.renames == {"DOG": "hound"} and printed["shared"] == []
    assert [(t.name, t.category_names) for t in m.tasks] == [("vehicles", ["car", "truck"]),
                                                             ("animals", ["Person", "hound"])]
    # vehicles' person boxes are dropped (outside the task) and its images are not complete for person
    recs = {(s["name"], s["split"]): s["complete_category_ids"] for s in m.source_records()}
    assert recs[("vehicles", "train")] == [1, 2] and recs[("animals", "train")] == [3, 4]
    assert m.data["splits"]["train"]["dropped"]["unassigned_category"] == 1
    ds = CocoDetection(m.split_json("train"), m.image_root("train"), [1, 2, 3, 4], train=False, aug=AUG)
    assert ds[1][1]["complete"].tolist() == [True, True, False, False]


# -- bad input -------------------------------------------------------------------------------------


def test_bad_merges_are_one_line_errors_and_write_nothing(sources, cli, tmp_path):
    yolo, coco = sources
    out = tmp_path / "out"
    ckpt = make_teacher(tmp_path / "coco.pt", {"ids": [1, 18], "names": ["person", "dog"]}, 0)
    empty = write_coco(tmp_path / "empty" / "e.json", [], [], [(1, "cat", "")])
    cases = [
        (merge_args(yolo, coco, out, "--rename", "horse=pony"), ["--rename horse=pony", "no source or teacher", str(coco)]),
        (["merge-tasks", "--task", f"a={yolo}:train", "--task", f"a={coco}", "--out", out], [str(coco), "two tasks are named 'a'"]),
        (merge_args(yolo, coco, out, "--teacher-only", f"coco={ckpt}", "--categories", "coco=person,cat"),
         ["coco.pt", "names category 'cat', which the teacher's label map lacks"]),
        (merge_args(yolo, coco, out, "--teacher-only", f"coco={ckpt}", "--val", f"coco={coco}"),
         ["coco.pt", "teacher-only", "gives it images"]),
        (merge_args(yolo, coco, out, "--task", f"again={coco}"), [str(coco), "which task 'animals' also holds"]),
        (merge_args(yolo, coco, out, "--task", f"none={empty}"), ["e.json", "task 'none' is empty"]),
        (merge_args(yolo, coco, out, "--rename", "dog=person"), [str(coco), "'Person' and 'dog'", "one name 'person'"]),
        (["merge-tasks", "--teacher-only", f"coco={ckpt}", "--out", out], ["coco.pt", "every task is teacher-only"]),
        (["merge-tasks", "--task", f"union={coco}", "--out", out], [str(coco), "'union'", "row of all sources"]),
    ]
    before = sorted(tmp_path.iterdir())
    for args, needles in cases:
        assert_one_line_error(cli(*args), *needles)
        assert sorted(tmp_path.iterdir()) == before  # no output, no temporary folder beside it


def test_train_teacher_refuses_a_teacher_only_task(sources, cli, tmp_path):
    yolo, coco = sources
    ckpt = make_teacher(tmp_path / "coco.pt", {"ids": [1, 18], "names": ["person", "dog"]}, 0)
    res = cli(*merge_args(yolo, coco, tmp_path / "t", "--teacher-only", f"coco={ckpt}"))
    assert res.exit_code == 0, res.stderr
    assert_one_line_error(
        cli("train-teacher", "--tasks", tmp_path / "t", "--task", "coco", "--config", "tiny", "--out", tmp_path / "run"),
        "tasks.yaml", "task 'coco' is teacher-only", "coco.pt",
    )
    assert not (tmp_path / "run").exists()


# -- teachers matched by name ----------------------------------------------------------------------


def test_remap_logits_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0]])  # teacher classes a, b, c, then no-object
    out = remap_logits(logits, [2, 0])  # task classes: c, a; b folds into no-object
    lse = 3.0 + math.log(1.0 + math.exp(-1.0))  # logsumexp(3, 2)
    torch.testing.assert_close(out, torch.tensor([[0.5, 1.0, lse]]))
    p, q = logits.softmax(-1)[0], out.softmax(-1)[0]
    torch.testing.assert_close(q, torch.stack([p[2], p[0], p[1] + p[3]]))
    # identity map: unchanged
    torch.testing.assert_close(remap_logits(logits, [0, 1, 2]), logits)


def test_match_classes_by_name_case_space_and_renames():
    lm = {"ids": [1, 2, 3, 4], "names": ["person", "Traffic Light", "motorcycle", "dog"]}
    assert match_classes(lm, "t", ["dog", "trafficlight", "motorbike"], {"Motor Cycle": "motorbike"}, "x.pt") == [3, 1, 2]
    with pytest.raises(KacliError, match="label map is not task 't''s: it lacks category 'cat'"):
        match_classes(lm, "t", ["dog", "cat"], {}, "x.pt")


def test_teacher_only_task_goes_through_cache_teachers(sources, cli, tmp_path):
    yolo, coco = sources
    # a COCO-like teacher: 4 named classes, 2 unnamed slots in its head (as an imported DETR has)
    coco_lm = {"ids": [1, 2, 3, 18], "names": ["person", "bicycle", "car", "dog"]}
    ckpt = make_teacher(tmp_path / "coco.pt", coco_lm, 7, unnamed_classes=2)
    out = tmp_path / "tasks"
    res = cli(*merge_args(yolo, coco, out, "--teacher-only", f"coco={ckpt}", "--categories", "coco=dog,bicycle"))
    assert res.exit_code == 0, res.stderr
    m = TaskManifest(out)
    assert m.task("coco").teacher == str(ckpt.resolve())
    assert [(t.name, t.category_ids) for t in m.tasks] == [("vehicles", [1, 2, 3]), ("animals", [2, 4]), ("coco", [4, 5])]
    assert json.loads(m.split_json("train", "coco").read_text())["images"] == []
    teachers = [make_teacher(tmp_path / f"{t.name}.pt", t.label_map(), k) for k, t in enumerate(m.tasks[:2])] + [ckpt]
    h5 = tmp_path / "cache.h5"
    args = ["cache-teachers", "--tasks", out, "--out", h5, "--views", "1", "--batch-size", "1", "--device", "cpu",
            "--workers", "0"]
    for t in teachers:
        args += ["--teacher", t]
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    with h5py.File(h5, "r") as f:
        a = schema.read_attrs(f)
        stored = f["teachers/2/logits"][...]
        assert f["teachers/0/logits"].shape == (4, 6, 4) and stored.shape == (4, 6, 3)
    assert a["label_map"] == {"ids": [1, 2, 3, 4, 5], "names": ["car", "person", "truck", "dog", "bicycle"]}
    t3 = a["teachers"][2]
    assert t3["class_map"] == [3, 1] and t3["label_map"] == {"ids": [4, 5], "names": ["dog", "bicycle"]}
    assert "class_map" not in a["teachers"][0] and t3["num_classes"] == 2
    cache = TeacherCache(h5)
    assert [c.tolist() for c in cache.class_index] == [[0, 1, 2], [1, 3], [3, 4]]  # person: class 1 for both
    # the stored distribution: the teacher's dog and bicycle probabilities, the rest as no-object
    model = build_model(load_checkpoint(ckpt)).eval()
    for e in range(len(cache)):
        image, target, _ = cache[e]
        images, mask, _ = collate([(image, target)], size_divisibility=16)
        with torch.inference_mode():
            p = model(images, mask)["pred_logits"][0].softmax(-1)  # (Q, 5): 4 named + no-object (unnamed folded in)
        q = torch.from_numpy(stored[e]).softmax(-1)
        torch.testing.assert_close(q, torch.stack([p[:, 3], p[:, 1], p[:, 0] + p[:, 2] + p[:, 4]], -1),
                                   rtol=1e-5, atol=1e-6)
    # cache-info names the sources and what each is complete for
    info = json.loads(cli("cache-info", h5, "--json").stdout)
    assert [(s["name"], s["complete"]) for s in info["sources"]] == [("vehicles", ["car", "person", "truck"]),
                                                                      ("animals", ["person", "dog"])]
    res = cli("cache-info", h5)
    assert "vehicles: yolo" in res.stdout and "complete for person, dog" in res.stdout


def test_cache_teachers_refuses_a_teacher_lacking_a_category(sources, cli, tmp_path):
    yolo, coco = sources
    out = tmp_path / "tasks"
    assert cli(*merge_args(yolo, coco, out)).exit_code == 0
    m = TaskManifest(out)
    good = make_teacher(tmp_path / "v.pt", m.tasks[0].label_map(), 0)
    bad = make_teacher(tmp_path / "a.pt", {"ids": [1, 2], "names": ["person", "cat"]}, 1)
    res = cli("cache-teachers", "--tasks", out, "--out", tmp_path / "c.h5", "--teacher", good, "--teacher", bad,
              "--device", "cpu", "--workers", "0")
    assert_one_line_error(res, "a.pt", "label map is not task 'animals''s: it lacks category 'dog'")
    assert not (tmp_path / "c.h5").exists()
