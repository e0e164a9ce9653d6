"""Training on tasks from several datasets: each image annotated only for its own source's categories.

The demo's shapes split into two halves: half A annotated only for the convex shapes, half B only
for the concave ones (a vehicles dataset and an animals dataset, in miniature), merged with
``merge-tasks``. The ground-truth loss must see which classes each image is annotated for; the
baselines ``raw`` (naive merge), ``raw-partial`` and ``pseudo`` train from the same cache; on a
single-dataset cache every ground-truth loss mode computes the losses of before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kacli.amalgamate import amalgamate, build_student
from kacli.amalgamation.config import check_method, load_amalgamate_config, teacher_settings
from kacli.amalgamation.objective import AmalgamationObjective
from kacli.cache.reader import TeacherCache, collate_cached
from kacli.cache.writer import cache_teachers
from kacli.data.demo_data import demo_partition, make_demo_data
from kacli.data.demo_sources import source_subset
from kacli.data.manifest import TaskManifest
from kacli.data.merge import TaskSource, merge_tasks
from kacli.data.split import split_tasks
from kacli.errors import KacliError
from kacli.eval.evaluate import evaluate_checkpoints
from kacli.losses.criterion import SetCriterion
from kacli.losses.matcher import HungarianMatcher
from kacli.models.checkpoint import load_checkpoint
from kacli.models.detr import DETR
from conftest import assert_one_line_error
from test_amalgamate import _teachers

QUIET = dict(log=lambda *a, **k: None)


def half_source(src: Path, out: Path, keep_images, keep_names: set[str]) -> Path:
    """A COCO json of ``src``'s images ``keep_images`` (indices in id order) annotated only for ``keep_names``."""
    d = json.loads(src.read_text())
    ids = [im["id"] for k, im in enumerate(sorted(d["images"], key=lambda im: im["id"])) if k in keep_images]
    out.write_text(json.dumps(source_subset(d, ids, sorted(keep_names), "one half")))
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """16 training and 8 validation images in two halves (convex-only, concave-only), merged; two
    random teachers and their cache; the same images as one fully labelled dataset, with its cache."""
    root = tmp_path_factory.mktemp("cross")
    make_demo_data(root / "data", train_images=16, val_images=8, seed=5, size=96, progress=False)
    part = demo_partition()
    tasks = []
    for k, name in enumerate(("convex", "concave")):
        train = half_source(root / "data" / "train.json", root / f"{name}-train.json", range(k, 16, 2), set(part[name]))
        val = half_source(root / "data" / "val.json", root / f"{name}-val.json", range(k, 8, 2), set(part[name]))
        tasks.append(TaskSource(name, train=str(train), val=str(val), images=str(root / "data" / "images"),
                                val_images=str(root / "data" / "images")))
    merge_tasks(tasks, root / "tasks")
    manifest = TaskManifest(root / "tasks")
    cache_teachers(manifest.path, _teachers(root, manifest, "x"), root / "cache.h5", views=1, dtype="float32",
                   batch_size=8, workers=0, device="cpu", progress=False, **QUIET)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "val.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks-full")
    full = TaskManifest(root / "tasks-full")
    cache_teachers(full.path, _teachers(root, full, "f"), root / "cache-full.h5", views=1, dtype="float32",
                   batch_size=8, workers=0, device="cpu", progress=False, **QUIET)
    return {"root": root, "manifest": manifest, "cache": root / "cache.h5", "full": root / "cache-full.h5"}


def _objective(cache_path: Path, overrides: dict) -> tuple[AmalgamationObjective, TeacherCache]:
    cache = TeacherCache(cache_path)
    cfg = load_amalgamate_config(None, overrides, teacher_settings(cache.attrs))
    needs = AmalgamationObjective.needs(cfg, cache.layer_names)
    cache = TeacherCache(cache_path, layers=needs.layers)
    return AmalgamationObjective(cfg, len(cache.label_map["ids"]), 2, needs.layers, list(cache.class_index)), cache


def _losses(cache_path: Path, overrides: dict, model_seed: int = 0) -> dict[str, float]:
    objective, cache = _objective(cache_path, overrides)
    torch.manual_seed(model_seed)
    model = build_student(objective.cfg, len(cache.label_map["ids"]), 2).train()
    batch = collate_cached([cache[i] for i in range(len(cache))])
    torch.manual_seed(1)
    with torch.no_grad():
        out = objective(model, batch, torch.device("cpu"))
    return {k: float(v) for k, v in out.items()}


def test_single_dataset_losses_are_the_same_for_every_ground_truth_loss(merged):
    """Every image complete for every class: mask and pseudo-gt compute exactly what DETR's set
    criterion computes (the ground-truth loss of before), for the student and for DETR."""
    for method in ("ka", "raw-ext"):
        before = _losses(merged["full"], {"method": method, "gt_loss": "none"})
        for mode in ("mask", "pseudo-gt"):
            assert _losses(merged["full"], {"method": method, "gt_loss": mode}) == before, (method, mode)
    raw = _losses(merged["full"], {"method": "raw"})
    assert _losses(merged["full"], {"method": "raw-partial"}) == raw
    assert _losses(merged["full"], {"method": "pseudo", "pseudo_threshold": 0.0}) == raw


def test_partial_images_bring_their_complete_classes_to_the_loss(merged):
    """On the merged cache the mask mode's classification loss is the masked criterion's on the
    batch's own ``complete`` sets; the naive merge's is the plain criterion's."""
    objective, cache = _objective(merged["cache"], {"method": "raw-partial"})
    batch = collate_cached([cache[i] for i in range(len(cache))])
    _, _, targets, _ = batch
    C = len(cache.label_map["ids"])
    convex = set(range(4))  # the student's classes: convex's 4, then concave's 4
    for t in targets:
        labels = set(t["labels"].tolist())
        assert labels <= {c for c in range(C) if t["complete"][c]}  # each image's labels are of its source
        assert set(torch.nonzero(t["complete"]).flatten().tolist()) in (convex, set(range(4, 8)))
    torch.manual_seed(0)
    model = DETR(objective.cfg.model, C).train()
    torch.manual_seed(1)
    with torch.no_grad():
        got = objective(model, batch, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(batch[0], batch[1])
    plain_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    masked = SetCriterion(C, HungarianMatcher(), eos_coef=0.1, mask_incomplete=True)(out, targets)
    plain = SetCriterion(C, HungarianMatcher(), eos_coef=0.1)(out, plain_targets)
    assert float(got["loss_ce"]) == pytest.approx(float(masked["loss_ce"]), rel=1e-6)
    assert float(masked["loss_ce"]) < float(plain["loss_ce"]) - 1e-3  # the other half's classes left out
    naive, _ = _objective(merged["cache"], {"method": "raw"})
    torch.manual_seed(1)
    with torch.no_grad():
        got_naive = naive(model, batch, torch.device("cpu"))
    assert float(got_naive["loss_ce"]) == pytest.approx(float(plain["loss_ce"]), rel=1e-6)


def test_baselines_train_and_record_their_ground_truth_loss(merged, tmp_path):
    for method, mode in (("raw-partial", "mask"), ("pseudo", "pseudo-gt")):
        run = tmp_path / method
        amalgamate(merged["cache"], None, None, run, device="cpu",
                   overrides={"method": method, "train.epochs": 3, "train.batch_size": 4, "train.eval_every": 3,
                              "pseudo_threshold": 0.2}, **QUIET)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["total"] < rows[0]["total"]
        assert set(rows[-1]["per_task"]) == {"convex", "concave"} and "per_source" in rows[-1]
        ck = load_checkpoint(run / "best.pt")
        assert ck["kind"] == "detr" and ck["meta"]["method"] == method and ck["meta"]["gt_loss"] == mode


def test_a_plain_method_refuses_another_ground_truth_loss(merged):
    cache = TeacherCache(merged["cache"])
    cfg = load_amalgamate_config(None, {"method": "raw", "gt_loss": "mask"}, teacher_settings(cache.attrs))
    with pytest.raises(KacliError, match="--method raw is DETR with the ground-truth loss 'none'"):
        check_method(cfg, 2, cache.layer_names)


def test_eval_on_a_merged_split_scores_each_source_and_the_union(merged, tmp_path):
    """A teacher is scored on its own source's images and categories; the union scores each
    category only on the images annotated for it."""
    m = merged["manifest"]
    teacher = merged["root"] / "x-convex.pt"
    res = evaluate_checkpoints([teacher], m.path, device_pref="cpu")
    assert set(res["per_source"]) == {"convex", "union"} and set(res["per_task"]) == {"convex"}
    val = json.loads(m.split_json("val").read_text())
    convex_images = [im["id"] for im in val["images"] if im["source"] == "convex"]
    assert res["per_source"]["convex"]["images"] == len(convex_images) == 4
    assert res["AP"] == res["per_source"]["union"]["AP"] == res["per_source"]["convex"]["AP"]
    both = evaluate_checkpoints([merged["root"] / "x-convex.pt", merged["root"] / "x-concave.pt"], m.path,
                                device_pref="cpu")
    assert set(both["per_source"]) == {"convex", "concave", "union"}



def test_bad_ground_truth_options_are_one_line_errors_and_write_nothing(merged, cli, tmp_path):
    run = tmp_path / "run"
    base = ["amalgamate", "--cache", merged["cache"], "--out", run, "--epochs", "1", "--device", "cpu"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("pseudo_threshold: 1.5\n")
    listed = sorted(tmp_path.iterdir())
    assert_one_line_error(cli(*base, "--method", "raw", "--gt-loss", "mask"),
                          "--method raw is DETR with the ground-truth loss 'none'")
    assert_one_line_error(cli(*base, "--gt-loss", "soft"), "gt_loss")
    assert_one_line_error(cli(*base, "--config", bad), "pseudo_threshold", "[0, 1]")
    assert sorted(tmp_path.iterdir()) == listed  # no run folder, no temporary one
