"""Dataset readers (COCO json, VOC, YOLO) and the bad inputs they must refuse through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from dataset_builders import boxes_by_name, write_coco, write_image, write_voc, write_yolo_from_coco

from kacli.data.coco import clip_box, normalize_coco
from kacli.data.readers import parse_spec, read_source
from kacli.errors import KacliError

CATS = [(1, "cat", "animal"), (2, "dog", "animal"), (3, "car", "vehicle")]


def leftovers(out: Path) -> list[str]:
    """Temporary folders atomic_dir would have left beside ``out``."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def split_fails(cli, out: Path, *args, needles=()):
    """split-tasks must fail as bad input, naming the file, leaving no output and no temp folder."""
    r = cli("split-tasks", *args, "--out", out)
    err = assert_one_line_error(r, *needles)
    assert not out.exists() and leftovers(out) == []
    return err


def small_coco(tmp_path: Path) -> Path:
    return write_coco(
        tmp_path / "ds" / "train.json",
        [("a.png", 64, 48), ("sub/b.png", 40, 40)],
        [(1, 1, [10, 5, 20, 10]), (1, 3, [0.5, 1.25, 7.5, 3.0]), (2, 2, [1, 2, 3, 4])],
        CATS,
    )


# ---------------------------------------------------------------------------------------------
# Box normalisation


@pytest.mark.parametrize(
    "box, expect, status",
    [
        ([10, 5, 20, 10], [10, 5, 20, 10], "ok"),
        ([-4, 40, 10, 20], [0, 40, 6, 8], "clipped"),  # image 64×48: x −4→0, bottom 60→48
        ([60, 0, 10, 10], [60, 0, 4, 10], "clipped"),
        ([70, 10, 5, 5], None, "outside"),
        ([5, 5, 0, 3], None, "degenerate"),
        ([5, 5, 3, -1], None, "degenerate"),
        ([5, float("nan"), 3, 3], None, "degenerate"),
    ],
)
def test_clip_box(box, expect, status):
    got, st = clip_box(box, 64, 48)
    assert st == status
    assert got == (None if expect is None else [float(v) for v in expect])


def test_normalize_counts_dropped_and_clipped_boxes(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "x.png", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 10]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [50, 40, 30, 30], "area": 900},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 0]},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [100, 100, 5, 5]},
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    out, rep = normalize_coco(coco, tmp_path / "x.json", image_root=tmp_path)
    assert (rep.degenerate, rep.outside_image, rep.clipped, rep.dropped) == (1, 1, 1, 2)
    assert [a["id"] for a in out["annotations"]] == [1, 2]
    assert out["annotations"][0] == {
        "id": 1, "image_id": 7, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0], "area": 200.0, "iscrowd": 0,
    }  # fmt: skip
    assert out["annotations"][1]["bbox"] == [50.0, 40.0, 14.0, 8.0]
    assert out["annotations"][1]["area"] == 112.0  # clipped: area shrinks to the clipped box
    assert out["categories"] == [{"id": 1, "name": "cat", "supercategory": ""}]


def test_annotation_ids_renumbered_when_unusable(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "width": 10, "height": 10}],
        "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}] * 2,
        "categories": [{"id": 1, "name": "cat"}],
    }
    out, _ = normalize_coco(coco, "x.json")
    assert [a["id"] for a in out["annotations"]] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Readers


def test_parse_spec(tmp_path):
    assert parse_spec("data/VOC2007:trainval") == (Path("data/VOC2007"), "trainval")
    assert parse_spec("data/train.json") == (Path("data/train.json"), None)
    assert parse_spec("a:b/c") == (Path("a:b/c"), None)
    odd = tmp_path / "x:y"
    odd.mkdir()
    assert parse_spec(str(odd)) == (odd, None)  # an existing path wins over PATH:SPLIT


def test_coco_reader(tmp_path):
    js = small_coco(tmp_path)
    coco = read_source(js)
    src = coco["info"]["source"]
    assert src["format"] == "coco" and src["image_root"] == str((tmp_path / "ds").resolve())
    assert len(src["sha256"]) == 64
    assert [im["file_name"] for im in coco["images"]] == ["a.png", "sub/b.png"]
    assert [a["bbox"] for a in coco["annotations"]] == [[10, 5, 20, 10], [0.5, 1.25, 7.5, 3.0], [1, 2, 3, 4]]
    assert coco["info"]["boxes"] == {"degenerate": 0, "outside_image": 0, "clipped": 0}


def test_coco_images_folder_option_and_fallback(tmp_path):
    # Images under <json folder>/images are found without --images; elsewhere --images names them.
    js = write_coco(tmp_path / "a" / "train.json", [("x.png", 8, 8)], [], CATS, image_root=tmp_path / "a" / "images")
    assert read_source(js)["info"]["source"]["image_root"] == str((tmp_path / "a" / "images").resolve())
    js2 = write_coco(tmp_path / "b" / "train.json", [("x.png", 8, 8)], [], CATS, image_root=tmp_path / "pix")
    with pytest.raises(KacliError, match="image files not found"):
        read_source(js2)
    assert read_source(js2, images=tmp_path / "pix")["info"]["source"]["image_root"] == str((tmp_path / "pix").resolve())


def test_voc_reader_boxes_difficult_and_standard_ids(tmp_path):
    root = write_voc(
        tmp_path / "VOC",
        {
            "000001": (100, 80, [("dog", [10, 20, 50, 60], 0), ("person", [0, 0, 30, 79], 1)]),
            "000002": (50, 50, [("aeroplane", [5, 5, 45, 60], 0)]),  # ymax 60 > 50: clipped
        },
        {"train": ["000001"], "val": ["000002"]},
    )
    tr = read_source(f"{root}:train")
    assert [(c["id"], c["name"]) for c in tr["categories"]][:3] == [(1, "aeroplane"), (2, "bicycle"), (3, "bird")]
    assert len(tr["categories"]) == 20  # all names are VOC's: the standard 20 ids
    assert tr["images"] == [{"id": 1, "file_name": "000001.jpg", "width": 100, "height": 80}]
    dog, person = tr["annotations"]
    assert (dog["category_id"], dog["bbox"], dog["iscrowd"]) == (12, [10.0, 20.0, 40.0, 40.0], 0)
    assert (person["category_id"], person["iscrowd"], person["difficult"]) == (15, 1, 1)
    va = read_source(f"{root}:val")
    assert va["annotations"][0]["bbox"] == [5.0, 5.0, 40.0, 45.0]
    assert va["info"]["boxes"]["clipped"] == 1
    assert read_source(root)["images"][1]["file_name"] == "000002.jpg"  # no split: every XML


def test_voc_reader_other_names_sorted_over_whole_folder(tmp_path):
    root = write_voc(
        tmp_path / "V",
        {"a": (20, 20, [("WBC", [1, 1, 5, 5], 0)]), "b": (20, 20, [("Platelets", [1, 1, 5, 5], 0)])},
        {"train": ["a"], "test": ["b"]},
    )
    # Both splits get the same ids although each sees one category.
    for split in ("train", "test"):
        assert [(c["id"], c["name"]) for c in read_source(f"{root}:{split}")["categories"]] == [
            (1, "Platelets"), (2, "WBC"),
        ]  # fmt: skip


@pytest.mark.parametrize("layout", ["images-split", "split-images"])
@pytest.mark.parametrize("names_as", ["list", "dict"])
def test_yolo_round_trip_identical_boxes(tmp_path, layout, names_as):
    src = {}
    for split, n in (("train", 3), ("val", 2)):
        js = write_coco(
            tmp_path / "coco" / f"{split}.json",
            [(f"{split}{i}.png", 64 + 8 * i, 48) for i in range(n)],
            [(1, 1, [10, 5, 20, 10]), (1, 3, [0.5, 1.25, 7.5, 3.0]), (2, 2, [1, 2, 3, 4]), (n, 3, [32.75, 0, 31.25, 48])],
            CATS,
        )
        src[split] = read_source(js)
    root = write_yolo_from_coco(tmp_path / "yolo", src, layout, names_as)
    for split in ("train", "val"):
        spec = f"{root}:{split}" if split == "train" else f"{root / 'data.yaml'}:{split}"
        got = read_source(spec)
        assert got["info"]["source"]["format"] == "yolo"
        assert [(c["id"], c["name"]) for c in got["categories"]] == [(1, "cat"), (2, "dog"), (3, "car")]
        assert boxes_by_name(got) == boxes_by_name(src[split])
        assert [(im["width"], im["height"]) for im in got["images"]] == [
            (im["width"], im["height"]) for im in src[split]["images"]
        ]


def test_yolo_names_dict_gaps_and_polygon(tmp_path):
    root = tmp_path / "y"
    write_image(root / "images" / "train" / "p.png", 100, 50)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "p.txt").write_text("5 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: images/train\nnames: {0: a, 5: b}\n")
    got = read_source(f"{root}:train")
    assert [(c["id"], c["name"]) for c in got["categories"]] == [(1, "a"), (6, "b")]
    assert [(a["category_id"], a["bbox"]) for a in got["annotations"]] == [(6, [10.0, 10.0, 20.0, 20.0]), (1, [40.0, 20.0, 20.0, 10.0])]


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2, one line naming the file, nothing written


def test_missing_source(cli, tmp_path):
    split_fails(cli, tmp_path / "out", "--train", tmp_path / "nope.json", "--scheme", "balanced:2",
                needles=["nope.json", "not found"])  # fmt: skip


def test_folder_of_coco_jsons_names_them(cli, tmp_path):
    small_coco(tmp_path)
    split_fails(cli, tmp_path / "out", "--train", tmp_path / "ds", "--scheme", "balanced:1",
                needles=["ds", "pass one of its COCO json files (train.json)"])  # fmt: skip


def test_malformed_json(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    split_fails(cli, tmp_path / "out", "--train", bad, "--scheme", "balanced:1", needles=["bad.json", "malformed JSON"])


def test_not_a_coco_file(cli, tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    split_fails(cli, tmp_path / "out", "--train", bad, "--scheme", "balanced:1", needles=["list.json", "not a COCO"])


def test_malformed_xml(cli, tmp_path):
    root = write_voc(tmp_path / "VOC", {"a": (20, 20, [("dog", [1, 1, 5, 5], 0)])}, {"train": ["a"]})
    (root / "Annotations" / "a.xml").write_text("<annotation><object>")
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["a.xml", "malformed XML"])  # fmt: skip


def test_voc_non_numeric_box_and_missing_split(cli, tmp_path):
    root = write_voc(tmp_path / "VOC", {"a": (20, 20, [("dog", ["x1", 1, 5, 5], 0)])}, {"train": ["a"]})
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["a.xml", "<xmin> is not a number"])  # fmt: skip
    split_fails(cli, tmp_path / "out", "--train", f"{root}:val", "--scheme", "balanced:1",
                needles=["val.txt", "split file not found", "train"])  # fmt: skip


def test_malformed_yolo_yaml_and_labels(cli, tmp_path):
    root = tmp_path / "y"
    write_image(root / "images" / "train" / "p.png", 10, 10)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("train: images/train\nnames: [a, b\n")
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["data.yaml", "malformed YAML"])  # fmt: skip
    (root / "data.yaml").write_text("train: images/train\nnames: [a, b]\n")
    (root / "labels" / "train" / "p.txt").write_text("0 0.5 0.5 0.1\n")
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["p.txt", "line 1", "expected 'class cx cy w h'"])  # fmt: skip
    (root / "labels" / "train" / "p.txt").write_text("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n")
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["p.txt", "line 2", "class 2 is not in the dataset's names"])  # fmt: skip


def test_unknown_image_and_category(cli, tmp_path):
    js = small_coco(tmp_path)
    d = json.loads(js.read_text())
    d["annotations"][0]["image_id"] = 99
    bad = js.with_name("bad_image.json")
    bad.write_text(json.dumps(d))
    split_fails(cli, tmp_path / "out", "--train", bad, "--scheme", "balanced:1",
                needles=["bad_image.json", "unknown image id 99"])  # fmt: skip
    d = json.loads(js.read_text())
    d["annotations"][2]["category_id"] = 42
    bad = js.with_name("bad_cat.json")
    bad.write_text(json.dumps(d))
    split_fails(cli, tmp_path / "out", "--train", bad, "--scheme", "balanced:1",
                needles=["bad_cat.json", "unknown category id 42"])  # fmt: skip


def test_image_path_escaping_root(cli, tmp_path):
    write_image(tmp_path / "secret.png", 8, 8)
    js = write_coco(tmp_path / "ds" / "train.json", [("../secret.png", 8, 8)], [(1, 1, [1, 1, 2, 2])], CATS)
    split_fails(cli, tmp_path / "out", "--train", js, "--scheme", "balanced:1",
                needles=["train.json", "escapes the image root"])  # fmt: skip
    root = write_voc(tmp_path / "VOC", {"a": (20, 20, [("dog", [1, 1, 5, 5], 0)])}, {"train": ["../../a"]})
    split_fails(cli, tmp_path / "out", "--train", f"{root}:train", "--scheme", "balanced:1",
                needles=["train.txt", "not a plain file name"])  # fmt: skip


def test_degenerate_and_out_of_image_boxes_counted(cli, tmp_path):
    js = write_coco(
        tmp_path / "ds" / "train.json",
        [("a.png", 64, 48)],
        [(1, 1, [10, 5, 20, 10]), (1, 1, [5, 5, 0, 4]), (1, 2, [60, 40, 10, 10]), (1, 2, [80, 1, 3, 3])],
        CATS,
    )
    out = tmp_path / "out"
    r = cli("split-tasks", "--train", js, "--scheme", "balanced:1", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "dropped 1 degenerate, 1 outside the image" in " ".join(r.stdout.split())
    assert "clipped 1" in r.stdout
    from kacli.data.manifest import TaskManifest

    m = TaskManifest(out)
    assert m.box_report("train") == {
        "dropped": {"degenerate": 1, "outside_image": 1, "unassigned_category": 0}, "clipped": 1,
    }  # fmt: skip
    all_boxes = [a["bbox"] for a in json.loads(m.split_json("train").read_text())["annotations"]]
    assert all_boxes == [[10, 5, 20, 10], [60.0, 40.0, 4.0, 8.0]]
