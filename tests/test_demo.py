"""The demo end to end, at a toy size: every stage runs and every promised file is written."""

from __future__ import annotations

import json

import pytest

import kacli.errors
from PIL import Image

from conftest import assert_one_line_error


@pytest.mark.slow
def test_demo_end_to_end_at_toy_size(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--train-images", 48, "--val-images", 12, "--test-images", 16, "--minutes", 0.5)
    assert r.exit_code == 0, r.stderr
    rows = json.loads((out / "report.json").read_text())
    # every reported figure is on the 16 test images; runs were selected on val (best.pt)
    assert {row["split"] for row in rows} == {"test"}
    assert [row["checkpoint"] for row in rows] == ["best.pt"] * 6
    assert json.loads((out / "eval" / "student.json").read_text())["images"] == 16
    assert len(json.loads((out / "tasks" / "test" / "all.json").read_text())["images"]) == 16
    names = [row["model"] for row in rows]
    assert names == ["teacher-convex", "teacher-concave", "ensemble", "raw", "student", "student-slim"]
    by = {row["model"]: row for row in rows}
    # the student is as compact as one teacher; the ensemble is both teachers
    assert by["student"]["params"] == by["student-slim"]["params"]
    assert by["ensemble"]["params"] == by["teacher-convex"]["params"] + by["teacher-concave"]["params"]
    # the slim student costs what raw DETR costs plus one 1x1 projection; the full one more
    assert by["student-slim"]["gflops"] == pytest.approx(by["raw"]["gflops"], rel=0.02)
    assert by["student"]["gflops"] > by["student-slim"]["gflops"]
    for row in rows:
        assert 0.0 <= row["AP"] <= 1.0
        assert set(row["per_task"]) <= {"convex", "concave"}
    assert set(by["student"]["per_task"]) == {"convex", "concave"}
    md = (out / "report.md").read_text()
    assert "| student-slim |" in md and "| raw |" in md
    assert Image.open(out / "curves.png").size[0] > 100
    pictures = sorted((out / "predictions").glob("*.png"))
    assert len(pictures) >= 3 and all(p.name.startswith("test_") for p in pictures)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["split"] == "test" and "val" in summary["selection"]
    assert set(summary["stages"]) >= {"data", "split", "cache", "student", "student-slim", "raw", "evaluate"}
    # curves come from each run's validation AP per epoch
    for run in ("raw", "student", "student-slim"):
        lines = [json.loads(x) for x in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any("AP" in x for x in lines)
    # a second run into the same folder is refused without --force, and nothing is lost
    before = (out / "report.json").read_bytes()
    r = cli("demo", "--out", out, "--train-images", 48, "--val-images", 12, "--minutes", 0.5)
    assert_one_line_error(r, "not empty")
    assert (out / "report.json").read_bytes() == before


@pytest.mark.slow
def test_cross_dataset_demo_end_to_end_at_toy_size(cli, tmp_path):
    """The cross-dataset scenario: teachers on their halves, students and the three baselines on
    the union, every row scored per source and on the union, the report's columns per source."""
    from kacli.models.checkpoint import load_checkpoint

    out = tmp_path / "demo"
    r = cli("demo", "--scenario", "cross-dataset", "--out", out, "--train-images", 120, "--val-images", 40,
            "--test-images", 40, "--minutes", 0.3)
    assert r.exit_code == 0, r.stderr
    rows = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in rows] == ["teacher-convex", "teacher-concave", "ensemble", "raw", "raw-partial",
                                              "pseudo", "student", "student-slim"]
    for row in rows:
        ev = json.loads((out / "eval" / f"{row['model']}.json").read_text())
        teacher = row["model"].removeprefix("teacher-") if row["model"].startswith("teacher-") else None
        assert set(row["per_source"]) == ({teacher, "union"} if teacher else {"convex", "concave", "union"})
        assert row["AP"] == ev["AP"] == ev["per_source"]["union"]["AP"]
        # each source is scored on its own half of the 40 test images, the union on all of them
        assert ev["split"] == "test" and ev["per_source"]["union"]["images"] == (20 if teacher else 40)
        assert all(ev["per_source"][s]["images"] == 20 for s in row["per_source"] if s != "union")
    md = (out / "report.md").read_text()
    assert "| AP convex | AP concave |" in md and "union of the sources" in md and "| pseudo |" in md
    # each teacher trained on its own half only; the baselines are DETR with their ground-truth losses
    assert load_checkpoint(out / "runs" / "teacher-convex" / "last.pt")["label_map"]["names"] == [
        "circle", "square", "triangle", "diamond"]
    tasks = json.loads((out / "tasks" / "train" / "convex.json").read_text())
    assert len(tasks["images"]) == 60
    meta = {name: load_checkpoint(out / "runs" / name / "last.pt")["meta"] for name in
            ("raw", "raw-partial", "pseudo", "student")}
    assert {n: (m["method"], m["gt_loss"]) for n, m in meta.items()} == {
        "raw": ("raw", "none"), "raw-partial": ("raw-partial", "mask"), "pseudo": ("pseudo", "pseudo-gt"),
        "student": ("ka", "mask")}
    summary = json.loads((out / "demo.json").read_text())
    assert summary["scenario"] == "cross-dataset"
    # each teacher sees half the images for twice the split demo's epochs (1 at this budget): the same steps
    assert summary["epochs"]["teacher"] == 2 and summary["epochs"]["student"] == 1
    teacher_lines = (out / "runs" / "teacher-convex" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["epoch"] for x in teacher_lines) == 2
    assert set(summary["stages"]) >= {"data", "merge", "cache", "raw-partial", "pseudo", "student", "evaluate"}
    assert len(list((out / "predictions").glob("*.png"))) >= 3


def test_demo_unknown_scenario_is_a_one_line_error(cli, tmp_path):
    assert_one_line_error(cli("demo", "--scenario", "both", "--out", tmp_path / "d"), "unknown demo scenario")
    assert list(tmp_path.iterdir()) == []  # no demo folder, no temporary one


def test_demo_force_keeps_the_old_demo_when_the_new_one_fails(cli, tmp_path, monkeypatch):
    """--force moves the old demo aside and puts it back when the new one fails."""
    import kacli.demo

    out = tmp_path / "demo"
    (out / "runs").mkdir(parents=True)
    (out / "report.md").write_text("the old report\n")
    (out / "runs" / "last.pt").write_bytes(b"old weights")

    def fail(path, **kw):
        raise kacli.errors.KacliError("disk full", path)

    monkeypatch.setattr(kacli.demo, "make_demo_data", fail)
    assert_one_line_error(cli("demo", "--out", out, "--force"), "disk full")
    assert (out / "report.md").read_text() == "the old report\n"
    assert (out / "runs" / "last.pt").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_cross_dataset_scenario_data_two_disjoint_half_labelled_sources(tmp_path):
    """The cross-dataset demo's tasks: two disjoint halves of the generated images, each annotated
    for its own task's shapes only (every such shape kept), merged with per-image complete sets."""
    from kacli.data.dataset import CocoDetection
    from kacli.data.demo_data import demo_partition, make_demo_data
    from kacli.data.demo_sources import split_halves
    from kacli.data.manifest import TaskManifest
    from kacli.demo import SCENARIOS

    make_demo_data(tmp_path / "data", train_images=120, val_images=40, test_images=20, seed=3, progress=False)
    tasks_path = SCENARIOS["cross-dataset"].make_tasks(tmp_path, 3)
    partition = demo_partition()
    assert list(partition) == ["convex", "concave"]
    manifest = TaskManifest(tasks_path)
    assert manifest.merged and manifest.task_names == ["convex", "concave"]
    names = {c["id"]: c["name"] for c in manifest.categories}
    for split, count in (("train", 120), ("val", 40), ("test", 20)):
        generated = json.loads((tmp_path / "data" / f"{split}.json").read_text())
        gen_name = {c["id"]: c["name"] for c in generated["categories"]}
        files = {}
        for task in partition:
            src = json.loads((tmp_path / "sources" / f"{task}-{split}.json").read_text())
            files[task] = {im["file_name"] for im in src["images"]}
            assert [c["name"] for c in src["categories"]] == partition[task]
            # every generated shape of the task's categories on the half's images, and nothing else
            ids = {im["id"] for im in src["images"]}
            expected = sorted((a["image_id"], gen_name[a["category_id"]], a["bbox"]) for a in generated["annotations"]
                              if a["image_id"] in ids and gen_name[a["category_id"]] in partition[task])
            src_name = {c["id"]: c["name"] for c in src["categories"]}
            assert sorted((a["image_id"], src_name[a["category_id"]], a["bbox"]) for a in src["annotations"]) == expected
            assert expected  # the half holds shapes of the task
        # two disjoint halves covering the split, as split_halves cuts them for this seed
        assert not files["convex"] & files["concave"]
        assert len(files["convex"]) == len(files["concave"]) == count // 2
        assert files["convex"] | files["concave"] == {im["file_name"] for im in generated["images"]}
        first, _ = split_halves([im["id"] for im in generated["images"]], 3, split)
        by_id = {im["id"]: im["file_name"] for im in generated["images"]}
        assert files["convex"] == {by_id[i] for i in first}
        # the merged split: each image's source and its complete categories
        merged = json.loads(manifest.split_json(split).read_text())
        complete = {t: [names[i] for i in ids] for t, ids in merged["complete_category_ids"].items()}
        assert complete == partition
        assert {im["file_name"] for im in merged["images"] if im["source"] == "convex"} == files["convex"]
        for a in merged["annotations"]:
            source = next(im["source"] for im in merged["images"] if im["id"] == a["image_id"])
            assert names[a["category_id"]] in partition[source]
    # a training target's `complete` follows its image's source, in the student's class order
    label_ids = manifest.student_label_map()["ids"]
    ds = CocoDetection(manifest.split_json("train"), manifest.image_root("train"), label_ids, train=False)
    sources = [im["source"] for im in json.loads(manifest.split_json("train").read_text())["images"]]
    for i in (0, 1, 2, 3):
        want = [names[c] in partition[sources[i]] for c in label_ids]
        assert ds[i][1]["complete"].tolist() == want
    # the halves depend on the seed, and only on it (not on the order the ids come in)
    ids = list(range(1, 121))
    first, second = split_halves(ids, 3, "train")
    assert len(first) == 60 and sorted(first + second) == ids
    assert split_halves(ids[::-1], 3, "train") == (first, second) != split_halves(ids, 4, "train")
