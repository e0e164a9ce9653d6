"""Training on tasks from several datasets: each image annotated only for its own source's categories.

The demo's shapes split into two halves: half A annotated only for the convex shapes, half B only
for the concave ones (a vehicles dataset and an animals dataset, in miniature), merged with
``merge-tasks``. The ground-truth loss must see which classes each image is annotated for; the
baselines ``raw`` (naive merge), ``raw-partial`` and ``pseudo`` train from the same cache; on a
single-dataset cache every ground-truth loss mode computes the losses of before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kacli.amalgamate import amalgamate, build_student
from kacli.amalgamation.config import check_method, load_amalgamate_config
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
from kacli.models.checkpoint import load_checkpoint
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
    cfg = load_amalgamate_config(None, overrides, cache.layout.teacher_settings())
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


QUERIES = 9  # GivenPredictions' queries: more than any image's objects


class GivenPredictions(nn.Module):
    """A detector whose predictions are set from the targets: on image b, query j < M_b sits on
    target j's box with logit log 5 at its class and 0 at the other C classes and "no object"; the
    other queries have every logit 0 and a box far from every object, so each target is matched to
    its own query. ``(images (B,3,H,W), mask) → {"pred_logits" (B,Q,C+1), "pred_boxes" (B,Q,4)}``."""

    def __init__(self, targets: list[dict], num_classes: int, queries: int):
        super().__init__()
        self.logits = torch.zeros(len(targets), queries, num_classes + 1)
        self.boxes = torch.tensor([0.02, 0.02, 0.01, 0.01]).repeat(len(targets), queries, 1)
        for b, t in enumerate(targets):
            m = len(t["labels"])
            self.logits[b, torch.arange(m), t["labels"]] = math.log(5)
            self.boxes[b, :m] = t["boxes"]

    def forward(self, images, mask):
        return {"pred_logits": self.logits.clone(), "pred_boxes": self.boxes.clone()}


def hand_loss_ce(targets: list[dict], num_classes: int, queries: int, mode: str) -> float:
    """:class:`GivenPredictions`' classification loss from the formula, eos_coef 0.1.

    Per image, V of the C classes are valid (complete or labelled; C under ``none``). A matched
    query's softmax over the valid classes and "no object" is 5 / (5 + V); an unmatched one's
    "no object" 1 / (V + 1), or under ``marginal`` (1 + C − V) / (C + 1) for "no object or an
    unlabelled class". Terms weigh 1 (matched) and 0.1 (unmatched); the sum is divided by the weights'.
    """
    C, num, den = num_classes, 0.0, 0.0
    for t in targets:
        m = len(t["labels"])
        valid = set(t["labels"].tolist()) | {c for c in range(C) if bool(t.get("complete", [True] * C)[c])}
        V = C if mode == "none" else len(valid)
        unmatched = math.log((C + 1) / (1 + C - V)) if mode == "marginal" else math.log(V + 1)
        num += m * math.log((5 + V) / 5) + 0.1 * (queries - m) * unmatched
        den += m + 0.1 * (queries - m)
    return num / den


def _given_losses(cache_path: Path, overrides: dict) -> tuple[dict[str, float], list[dict]]:
    """The objective's losses for :class:`GivenPredictions` on the whole cache in one batch."""
    objective, cache = _objective(cache_path, overrides)
    batch = collate_cached([cache[i] for i in range(len(cache))])
    targets = batch[2]
    model = GivenPredictions(targets, len(cache.label_map["ids"]), QUERIES)
    with torch.no_grad():
        out = objective(model, batch, torch.device("cpu"))
    return {k: float(v) for k, v in out.items()}, targets


def test_single_dataset_losses_are_the_same_for_every_ground_truth_loss(merged):
    """Every image complete for every class: mask, marginal and pseudo-gt compute exactly what
    DETR's set criterion computes (the ground-truth loss of before), for the student and for DETR;
    on given predictions, its value from the formula."""
    settings = [{"method": "raw"}, {"method": "raw-partial"}, {"method": "raw-partial", "gt_loss": "marginal"},
                {"method": "pseudo", "pseudo_threshold": 0.0}]
    settings += [{"method": "raw-ext", "gt_loss": mode} for mode in ("none", "mask", "marginal", "pseudo-gt")]
    for overrides in settings:
        got, targets = _given_losses(merged["full"], overrides)
        assert max(len(t["labels"]) for t in targets) < QUERIES and all("complete" in t for t in targets)
        want = hand_loss_ce(targets, 8, QUERIES, "none")
        assert got["loss_ce"] == pytest.approx(want, rel=1e-6), overrides
        assert got["loss_bbox"] == pytest.approx(0.0, abs=1e-6) and got["loss_giou"] == pytest.approx(0.0, abs=1e-5)
        assert got["loss_d"] == pytest.approx(want, abs=1e-4)  # weight 1: L_d is the criterion's total
    for method in ("ka", "raw-ext"):
        before = _losses(merged["full"], {"method": method, "gt_loss": "none"})
        assert before["loss_ce"] > 0 and math.isfinite(before["total"])
        for mode in ("mask", "marginal", "pseudo-gt"):
            assert _losses(merged["full"], {"method": method, "gt_loss": mode}) == before, (method, mode)
    raw = _losses(merged["full"], {"method": "raw"})
    assert raw["loss_ce"] > 0 and math.isfinite(raw["total"])
    assert _losses(merged["full"], {"method": "raw-partial"}) == raw
    assert _losses(merged["full"], {"method": "raw-partial", "gt_loss": "marginal"}) == raw
    assert _losses(merged["full"], {"method": "pseudo", "pseudo_threshold": 0.0}) == raw


def test_partial_images_bring_their_complete_classes_to_the_loss(merged):
    """On the merged cache each image is complete for its source's 4 of the 8 classes; the
    objective's classification loss on given predictions is the formula's with those sets: the
    naive merge's (all 8 classes), mask's and marginal's (4 valid classes)."""
    got, targets = {}, None
    for overrides, mode in (({"method": "raw"}, "none"), ({"method": "raw-partial"}, "mask"),
                            ({"method": "raw-partial", "gt_loss": "marginal"}, "marginal")):
        losses, targets = _given_losses(merged["cache"], overrides)
        got[mode] = losses["loss_ce"]
    convex = set(range(4))  # the student's classes: convex's 4, then concave's 4
    for t in targets:
        labels = set(t["labels"].tolist())
        assert labels <= {c for c in range(8) if t["complete"][c]}  # each image's labels are of its source
        assert set(torch.nonzero(t["complete"]).flatten().tolist()) in (convex, set(range(4, 8)))
    assert max(len(t["labels"]) for t in targets) < QUERIES
    # With M matched and U = 9·16 − M unmatched queries in all:
    #   none (M·log(13/5) + .1·U·log 9) / (M + .1·U), mask (M·log(9/5) + .1·U·log 5) / (M + .1·U),
    #   marginal (M·log(9/5) + .1·U·log(9/5)) / (M + .1·U) = log(9/5).
    M = sum(len(t["labels"]) for t in targets)
    U = QUERIES * len(targets) - M
    assert M > 0
    want = {"none": (M * math.log(13 / 5) + 0.1 * U * math.log(9)) / (M + 0.1 * U),
            "mask": (M * math.log(9 / 5) + 0.1 * U * math.log(5)) / (M + 0.1 * U),
            "marginal": math.log(9 / 5)}
    for mode in want:
        assert want[mode] == pytest.approx(hand_loss_ce(targets, 8, QUERIES, mode), rel=1e-12)
        assert got[mode] == pytest.approx(want[mode], rel=1e-6), mode


def test_no_ground_truth_term_with_lambda_d_zero(merged, monkeypatch):
    """ka with λ_d = 0 computes no ground-truth loss: the criterion is never called, its terms are
    absent and the total is λ_seq·L_seq + λ_task·L_task. With TA off too, no loss reaches the decoder
    and the heads (only the ground-truth loss would): their gradients are None, where λ_d = 0.1
    gives them a gradient."""

    def grads(overrides: dict, refuse_criterion: bool) -> tuple[dict, dict]:
        objective, cache = _objective(merged["full"], overrides)
        if refuse_criterion:
            monkeypatch.setattr(objective.criterion, "forward", lambda *a, **k: pytest.fail("criterion called"))
        torch.manual_seed(0)
        model = build_student(objective.cfg, len(cache.label_map["ids"]), 2).train()
        losses = objective(model, collate_cached([cache[i] for i in range(4)]), torch.device("cpu"))
        losses["total"].backward()
        return losses, {n: p.grad for n, p in model.named_parameters()}

    gt_keys = {"loss_d", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"}
    losses, _ = grads({"method": "ka", "lambda_d": 0.0}, True)
    assert not gt_keys & set(losses) and {"loss_seq", "loss_task"} <= set(losses)
    assert losses["total"].item() == pytest.approx(losses["loss_seq"].item() + losses["loss_task"].item(), rel=1e-6)
    heads = ("transformer.decoder.", "class_embed.", "bbox_embed.", "query_embed.")
    losses, off = grads({"method": "ka", "lambda_d": 0.0, "ta.enabled": False}, True)
    assert set(losses) - {"total"} == {"loss_seq", "sa_proj", "sa_enc1", "sa_enc2"}
    assert all(off[n] is None for n in off if n.startswith(heads)) and any(n.startswith(heads) for n in off)
    assert off["transformer.encoder.layers.0.linear1.weight"].abs().sum() > 0  # SA reaches the encoder
    losses, on = grads({"method": "ka", "lambda_d": 0.1, "ta.enabled": False}, False)
    assert gt_keys <= set(losses)
    for head in heads:
        assert sum(float(g.abs().sum()) for n, g in on.items() if n.startswith(head) and g is not None) > 0, head


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

    def cfg(overrides):
        return load_amalgamate_config(None, overrides, cache.layout.teacher_settings())

    with pytest.raises(KacliError, match="--method raw is DETR with the ground-truth loss 'none';"):
        check_method(cfg({"method": "raw", "gt_loss": "mask"}), 2, cache.layer_names)
    with pytest.raises(KacliError, match="--method raw-partial is DETR with the ground-truth loss 'mask' or "
                                         "'marginal'; gt_loss 'pseudo-gt'"):
        check_method(cfg({"method": "raw-partial", "gt_loss": "pseudo-gt"}), 2, cache.layer_names)
    for gt_loss, mode in ((None, "mask"), ("mask", "mask"), ("marginal", "marginal")):
        ok = cfg({"method": "raw-partial", "gt_loss": gt_loss})
        check_method(ok, 2, cache.layer_names)
        assert ok.ground_truth_loss == mode and ok.plain_detr
    assert cfg({"method": "ka", "gt_loss": "marginal"}).ground_truth_loss == "marginal"


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
