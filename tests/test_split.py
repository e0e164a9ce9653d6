"""Task schemes, ``split_tasks``, the task manifest, and ``kacli split-tasks`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BCCD, assert_one_line_error
from dataset_builders import VOC_NAMES, write_coco, write_voc

from kacli.data.manifest import TaskManifest
from kacli.data.schemes import balanced_partition, resolve_scheme
from kacli.data.split import split_tasks
from kacli.errors import KacliError

# DESIGN.md, "The paper's partitions, decoded".
DESIGN_VOC2 = {
    "t1": "aeroplane bicycle bird boat bottle bus car cat chair cow".split(),
    "t2": "diningtable dog horse motorbike person pottedplant sheep sofa train tvmonitor".split(),
}
DESIGN_VOC4 = {
    "t1": "aeroplane bicycle bird boat bottle".split(),
    "t2": "bus car cat chair cow".split(),
    "t3": "diningtable dog horse motorbike person".split(),
    "t4": "pottedplant sheep sofa train tvmonitor".split(),
}
DESIGN_COCO2 = {
    "t1": [int(v) for v in "1 2 3 4 5 10 11 16 17 18 19 20 27 28 31 34 35 36 37 38 44 46 47 52 53 54 55 56 62 63 64 72 73 74 78 79 80 84 85 86".split()],
    "t2": [int(v) for v in "6 7 8 9 13 14 15 21 22 23 24 25 32 33 39 40 41 42 43 48 49 50 51 57 58 59 60 61 65 67 70 75 76 77 81 82 87 88 89 90".split()],
}  # fmt: skip
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def voc20(tmp_path) -> Path:
    """A VOC root whose 20 images hold one object each of the 20 VOC classes (in reverse order)."""
    items = {f"{i:06d}": (40, 30, [(n, [2, 3, 20 + i % 5, 25], 0)]) for i, n in enumerate(reversed(VOC_NAMES))}
    stems = sorted(items)
    return write_voc(tmp_path / "VOC", items, {"trainval": stems[:14], "test": stems[14:]})


@pytest.fixture
def coco3(tmp_path) -> Path:
    """Train/val COCO jsons: 3 images, categories cat(1) dog(2) car(3) bus(5)."""
    cats = [(1, "cat", "animal"), (2, "dog", "animal"), (3, "car", "vehicle"), (5, "bus", "vehicle")]
    anns = [(1, 1, [1, 1, 5, 5]), (1, 2, [10, 10, 5, 5]), (2, 3, [3, 3, 8, 8]), (2, 5, [0, 0, 4, 4]),
            (3, 1, [2, 2, 2, 2]), (3, 1, [6, 6, 2, 2])]  # fmt: skip
    for split in ("train", "val"):
        write_coco(tmp_path / "c" / f"{split}.json", [(f"{split}{i}.png", 32, 32) for i in range(3)], anns, cats)
    return tmp_path / "c"


def write_partition(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Presets against DESIGN.md's tables


@pytest.mark.parametrize("scheme, table", [("voc-2", DESIGN_VOC2), ("voc-4", DESIGN_VOC4)])
def test_voc_presets_match_design_tables(cli, voc20, tmp_path, scheme, table):
    out = tmp_path / scheme
    r = cli("split-tasks", "--train", f"{voc20}:trainval", "--val", f"{voc20}:test", "--scheme", scheme, "--out", out)
    assert r.exit_code == 0, r.stderr
    m = TaskManifest(out / "tasks.yaml")
    assert {t.name: sorted(t.category_names) for t in m.tasks} == {k: sorted(v) for k, v in table.items()}
    # Standard VOC ids: alphabetical order, 1..20.
    for t in m.tasks:
        assert t.category_ids == [VOC_NAMES.index(n) + 1 for n in t.category_names]
    # Every object lands in exactly one task; per-split counts add up.
    for split, n in (("train", 14), ("val", 6)):
        assert sum(t.counts[split]["annotations"] for t in m.tasks) == n
        assert all(t.counts[split]["images"] == n for t in m.tasks)


def test_coco2_matches_design_table(tmp_path):
    cats = [(i, f"c{i}", "s") for i in COCO_IDS]
    js = write_coco(tmp_path / "coco80" / "train.json", [("a.png", 16, 16)], [(1, i, [1, 1, 3, 3]) for i in COCO_IDS], cats)
    man = split_tasks(js, None, "coco-2", tmp_path / "out")
    assert {t["name"]: t["category_ids"] for t in man["tasks"]} == DESIGN_COCO2
    assert [t["counts"]["train"]["annotations"] for t in man["tasks"]] == [40, 40]


def test_preset_on_wrong_dataset_names_dataset(cli, coco3, tmp_path):
    r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", "voc-2", "--out", tmp_path / "o")
    assert_one_line_error(r, "train.json", "scheme voc-2", "unknown category name 'aeroplane'")


# ---------------------------------------------------------------------------------------------
# balanced:N


def test_balanced_spreads_supercategories():
    cats = [{"id": i, "name": f"c{i}", "supercategory": "ab"[i % 2] + "x"} for i in range(1, 9)]
    parts = balanced_partition(cats, 2)
    # Groups in name order, dealt round-robin: ax = 2 4 6 8 → t1 t2 t1 t2, bx = 1 3 5 7 → t1 t2 t1 t2.
    assert parts == {"t1": [1, 2, 5, 6], "t2": [3, 4, 7, 8]}  # each part: two of "ax", two of "bx"
    assert balanced_partition(cats, 2) == parts  # deterministic


def test_balanced_by_annotation_count_without_supercategories():
    cats = [{"id": i, "name": f"c{i}", "supercategory": ""} for i in range(1, 6)]
    counts = {1: 100, 2: 60, 3: 50, 4: 30, 5: 5}
    # Greedy, most annotated first, into the lightest part with room (sizes 3 and 2):
    # 1→t1(100) 2→t2(60) 3→t2(110) 4→t1(130) 5→t1(135)
    assert balanced_partition(cats, 2, counts) == {"t1": [1, 4, 5], "t2": [2, 3]}
    parts = balanced_partition(cats, 3, counts)
    assert sorted(len(p) for p in parts.values()) == [1, 2, 2]


def test_balanced_errors(cli, coco3, tmp_path):
    for scheme, needle in (("balanced:5", "5 parts but only 4 categories"), ("balanced:0", "at least 1"),
                           ("balanced:x", "whole number")):  # fmt: skip
        r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", scheme, "--out", tmp_path / "o")
        assert_one_line_error(r, "train.json", needle)


# ---------------------------------------------------------------------------------------------
# Partition files: split contents, and every bad partition


def test_partition_file_split_contents(cli, coco3, tmp_path):
    part = write_partition(tmp_path / "p.yaml", "tasks:\n  pets: [cat, 2]\n  road: [car, bus]\n")
    out = tmp_path / "out"
    r = cli("split-tasks", "--train", coco3 / "train.json", "--val", coco3 / "val.json", "--scheme", part, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "pets" in r.stdout and "cat, dog" in r.stdout
    m = TaskManifest(out)
    assert [(t.name, t.category_ids, t.category_names) for t in m.tasks] == [
        ("pets", [1, 2], ["cat", "dog"]), ("road", [3, 5], ["car", "bus"]),
    ]  # fmt: skip
    assert m.tasks[0].counts["train"] == {"images": 3, "images_with_objects": 2, "annotations": 4}
    assert m.tasks[1].counts["val"] == {"images": 3, "images_with_objects": 1, "annotations": 2}
    for split in ("train", "val"):
        full = json.loads(m.split_json(split).read_text())
        parts = {t.name: json.loads(m.split_json(split, t.name).read_text()) for t in m.tasks}
        ids = [sorted(a["id"] for a in p["annotations"]) for p in parts.values()]
        assert set(ids[0]).isdisjoint(ids[1])
        assert sorted(ids[0] + ids[1]) == sorted(a["id"] for a in full["annotations"])
        for t in m.tasks:
            p = parts[t.name]
            assert p["images"] == full["images"]  # every task keeps every image
            assert [c["id"] for c in p["categories"]] == t.category_ids
            assert {a["category_id"] for a in p["annotations"]} <= set(t.category_ids)
        assert m.image_root(split) == (coco3).resolve()


def test_test_split_written_beside_val(cli, coco3, tmp_path):
    """--test adds a third split, laid out as val: selection happens on val, reports on test."""
    part = write_partition(tmp_path / "p.yaml", "tasks:\n  pets: [cat, 2]\n  road: [car, bus]\n")
    out = tmp_path / "out"
    r = cli("split-tasks", "--train", coco3 / "train.json", "--val", coco3 / "val.json", "--test", coco3 / "val.json",
            "--scheme", part, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "test: dropped 0 degenerate" in r.stdout
    m = TaskManifest(out)
    assert m.splits == ["train", "val", "test"]
    assert m.data["sources"]["test"]["path"] == m.data["sources"]["val"]["path"]
    assert m.tasks[1].counts["test"] == m.tasks[1].counts["val"] == {"images": 3, "images_with_objects": 1,
                                                                         "annotations": 2}
    assert json.loads(m.split_json("test", "road").read_text())["annotations"] == \
        json.loads(m.split_json("val", "road").read_text())["annotations"]


def test_val_categories_checked_and_task_lists_complete(coco3, tmp_path):
    # A val json listing fewer categories still gets each task's full category list.
    d = json.loads((coco3 / "val.json").read_text())
    d["categories"] = [c for c in d["categories"] if c["id"] != 5]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 5]
    (coco3 / "val.json").write_text(json.dumps(d))
    man = split_tasks(coco3 / "train.json", coco3 / "val.json", "balanced:1", tmp_path / "out")
    val = json.loads((tmp_path / "out" / "val" / "t1.json").read_text())
    assert [c["id"] for c in val["categories"]] == [1, 2, 3, 5] == man["tasks"][0]["category_ids"]
    from pycocotools.coco import COCO

    gt = COCO(str(tmp_path / "out" / "val" / "t1.json"))
    assert sorted(gt.getCatIds()) == [1, 2, 3, 5] and len(gt.getAnnIds()) == 5
    # Same id, different name: refused, naming the val file.
    d["categories"][0]["name"] = "kitten"
    (coco3 / "val.json").write_text(json.dumps(d))
    with pytest.raises(KacliError, match="category id 1 is 'kitten' here but 'cat' in the training set") as e:
        split_tasks(coco3 / "train.json", coco3 / "val.json", "balanced:1", tmp_path / "out2")
    assert e.value.path.endswith("val.json") and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "text, needles",
    [
        ("tasks:\n  a: [cat, dog]\n  b: [dog, car, bus]\n", ["category 'dog' (id 2) is in both tasks 'a' and 'b'"]),
        ("tasks:\n  a: [cat, dog, horse]\n  b: [car, bus]\n", ["unknown category name 'horse'"]),
        ("tasks:\n  a: [cat, dog, 7]\n  b: [car, bus]\n", ["unknown category id 7"]),
        ("tasks:\n  a: [cat, dog]\n  b: [car]\n", ["1 categories are in no task ('bus')", "--allow-partial"]),
        ("tasks: {}\n", ["the partition is empty"]),
        ("tasks:\n", ["the partition is empty"]),
        ("tasks:\n  a: [cat, dog, car, bus]\n  b: []\n", ["task 'b' is empty"]),
        ("tasks:\n  all: [cat, dog, car, bus]\n", ["task name 'all'"]),
        ("task:\n  a: [cat]\n", ["not a partition file"]),
        ("tasks:\n  a: [cat, dog, car, bus]\nextra: 1\n", ["unknown key(s) 'extra'"]),
        ("tasks:\n  a: [cat, dog\n", ["malformed YAML"]),
    ],
)
def test_bad_partitions(cli, coco3, tmp_path, text, needles):
    part = write_partition(tmp_path / "part.yaml", text)
    out = tmp_path / "out"
    r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", part, "--out", out)
    assert_one_line_error(r, "part.yaml", *needles)
    assert not out.exists() and leftovers(out) == []


def test_missing_scheme_file(cli, coco3, tmp_path):
    r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", tmp_path / "nope.yaml", "--out", tmp_path / "o")
    assert_one_line_error(r, "nope.yaml", "nor an existing partition YAML file")


def test_allow_partial(cli, coco3, tmp_path):
    part = write_partition(tmp_path / "p.yaml", "tasks:\n  a: [cat]\n  b: [car]\n")
    out = tmp_path / "out"
    r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", part, "--out", out, "--allow-partial")
    assert r.exit_code == 0, r.stderr
    m = TaskManifest(out)
    assert m.category_ids == [1, 3]
    full = json.loads(m.split_json("train").read_text())
    assert [c["id"] for c in full["categories"]] == [1, 3]
    assert sorted(a["category_id"] for a in full["annotations"]) == [1, 1, 1, 3]
    assert m.box_report("train")["dropped"]["unassigned_category"] == 2  # dog + bus


# ---------------------------------------------------------------------------------------------
# Output folder handling


def test_non_empty_output_needs_force_and_failures_keep_it(cli, coco3, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("split-tasks", "--train", coco3 / "train.json", "--scheme", "balanced:2", "--out", out)
    assert_one_line_error(cli(*args), str(out), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # A failing run with --force keeps the old output too.
    bad = write_partition(tmp_path / "bad.yaml", "tasks:\n  a: [nothing]\n")
    r = cli("split-tasks", "--train", coco3 / "train.json", "--scheme", bad, "--out", out, "--force")
    assert_one_line_error(r, "bad.yaml")
    assert (out / "keep.txt").read_text() == "mine" and leftovers(out) == []
    assert cli(*args, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "tasks.yaml").is_file() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# TaskManifest


def test_manifest_api_and_relocation(coco3, tmp_path):
    split_tasks(coco3 / "train.json", coco3 / "val.json", "balanced:2", tmp_path / "out")
    moved = tmp_path / "elsewhere" / "tasks"
    shutil.move(tmp_path / "out", moved)
    m = TaskManifest(moved / "tasks.yaml")
    assert m.path == (moved / "tasks.yaml").resolve() and len(m.sha256) == 64
    assert m.task_names == ["t1", "t2"] and m.splits == ["train", "val"]
    assert sorted(m.task("t1").category_ids + m.task("t2").category_ids) == m.category_ids == [1, 2, 3, 5]
    assert m.split_json("val", "t2") == moved.resolve() / "val" / "t2.json"  # relative to tasks.yaml
    assert m.task_of(m.task("t2").category_ids[0]) == "t2"
    assert m.task("t1").label_map() == {"ids": m.task("t1").category_ids, "names": m.task("t1").category_names}
    with pytest.raises(KacliError, match="no task 't9'") as e:
        m.task("t9")
    assert e.value.path.endswith("tasks.yaml")
    with pytest.raises(KacliError, match="no split 'test'"):
        m.split_json("test")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(format="kacli-tasks/0"), "not a kacli task manifest"),
        (lambda d: d["tasks"][1].update(category_ids=d["tasks"][0]["category_ids"],
                                        category_names=d["tasks"][0]["category_names"]), "in both tasks"),  # fmt: skip
        (lambda d: d["splits"]["train"]["tasks"].pop("t1"), "must list a file for every task"),
        (lambda d: d.pop("categories"), "'categories' must be a list"),
    ],
)
def test_manifest_refuses_bad_files(coco3, tmp_path, edit, needle):
    split_tasks(coco3 / "train.json", None, "balanced:2", tmp_path / "out")
    p = tmp_path / "out" / "tasks.yaml"
    d = yaml.safe_load(p.read_text())
    edit(d)
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(KacliError, match=needle) as e:
        TaskManifest(p)
    assert e.value.path == str(p.resolve())


def test_manifest_missing_file(tmp_path):
    with pytest.raises(KacliError, match="not found"):
        TaskManifest(tmp_path / "tasks.yaml")


def test_resolve_scheme_sorts_ids_and_keeps_task_order(tmp_path):
    cats = [{"id": i, "name": n, "supercategory": ""} for i, n in ((4, "d"), (1, "a"), (2, "b"), (3, "c"))]
    part = write_partition(tmp_path / "p.yaml", "tasks:\n  z: [d, a]\n  y: [3, b]\n")
    assert list(resolve_scheme(str(part), cats).items()) == [("z", [1, 4]), ("y", [2, 3])]


# ---------------------------------------------------------------------------------------------
# A real dataset: BCCD (VOC layout), two tasks


@pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/datasets/bccd is not present")
def test_bccd_two_tasks(cli, tmp_path):
    from kacli.data.readers import read_source

    part = write_partition(tmp_path / "bccd.yaml", "tasks:\n  red: [RBC]\n  white: [WBC, Platelets]\n")
    out = tmp_path / "bccd"
    r = cli("split-tasks", "--train", f"{BCCD}:trainval", "--val", f"{BCCD}:test", "--scheme", part, "--out", out)
    assert r.exit_code == 0, r.stderr
    m = TaskManifest(out)
    assert sorted(m.category_names) == ["Platelets", "RBC", "WBC"]
    for split, spec in (("train", "trainval"), ("val", "test")):
        n_images = len((BCCD / "ImageSets" / "Main" / f"{spec}.txt").read_text().split())
        n_objects = sum(
            (BCCD / "Annotations" / f"{s}.xml").read_text().count("<object>")
            for s in (BCCD / "ImageSets" / "Main" / f"{spec}.txt").read_text().split()
        )
        dropped = sum(m.box_report(split)["dropped"].values())
        files = {t.name: json.loads(m.split_json(split, t.name).read_text()) for t in m.tasks}
        ids = {t: {a["id"] for a in f["annotations"]} for t, f in files.items()}
        assert ids["red"].isdisjoint(ids["white"])
        assert len(ids["red"]) + len(ids["white"]) == n_objects - dropped
        assert all(len(f["images"]) == n_images for f in files.values())
        assert m.image_root(split) == (BCCD / "JPEGImages").resolve()
    # The two zero-size RBC boxes (BloodImage_00338, _00343) are both in trainval, reported as dropped.
    assert m.box_report("train")["dropped"]["degenerate"] == 2
    assert read_source(f"{BCCD}:trainval")["info"]["boxes"]["examples"][0].startswith("BloodImage_00338")
