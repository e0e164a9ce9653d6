"""kacli amalgamate on a real tiny teacher cache: the objective, each method's run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line_error
import kacli.amalgamate as amalgamate_module
from kacli.amalgamate import amalgamate
from kacli.amalgamation.config import AmalgamateConfig, load_amalgamate_config
from kacli.amalgamation.objective import AmalgamationObjective
from kacli.cache.reader import TeacherCache, collate_cached
from kacli.cache.schema import teacher_settings
from kacli.cache.writer import cache_teachers
from kacli.config import load_config
from kacli.data.demo_data import make_demo_data
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks
from kacli.losses.sequence import SAGProjection
from kacli.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from kacli.models.compress import select_parts
from kacli.models.config import model_config
from kacli.models.detr import DETR
from kacli.models.student import Student

MODEL = {"backbone": "tiny", "tiny_widths": [8, 8, 16, 16], "d_model": 32, "nheads": 4, "enc_layers": 2,
         "dec_layers": 2, "dim_feedforward": 64, "dropout": 0.0, "num_queries": 6, "pre_norm": True}
AUG = {"scales": [64], "max_size": 64, "crop_scales": [64], "crop_min": 48, "crop_max": 64, "crop_p": 0.0,
       "flip_p": 0.5, "eval_size": 64}
TRAIN = {"epochs": 4, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000, "workers": 0,
         "eval_every": 100, "seed": 0}


def _teachers(root: Path, manifest: TaskManifest, tag: str) -> list[Path]:
    """Random teachers sharing one backbone and transformer; each has its own input projection
    and class head (so a student built from them reproduces every teacher's sequences)."""
    cfg = model_config(MODEL)
    torch.manual_seed(0)
    base = DETR(cfg, 1)
    paths = []
    for k, task in enumerate(manifest.tasks):
        torch.manual_seed(100 + k)
        m = DETR(cfg, len(task.category_ids))
        shared = {n: v for n, v in base.state_dict().items() if not n.startswith(("class_embed", "input_proj"))}
        m.load_state_dict(shared, strict=False)
        path = root / f"{tag}-{task.name}.pt"
        save_checkpoint(path, {"kind": "detr", "arch": cfg.to_dict(), "label_map": task.label_map(), "task": task.name,
                               "model": m.state_dict(), "config": {"model": cfg.to_dict(), "aug": AUG, "train": TRAIN}})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 training and 4 validation demo images (96 px, viewed at 64 px), two tasks, two random
    teachers, their float32 cache; plus a one-task manifest with its one-teacher cache."""
    root = tmp_path_factory.mktemp("amalgamate")
    make_demo_data(root / "data", train_images=12, val_images=4, seed=3, size=96, progress=False)
    train, val = str(root / "data" / "train.json"), str(root / "data" / "val.json")
    split_tasks(train, val, str(root / "data" / "tasks-2.yaml"), root / "tasks")
    manifest = TaskManifest(root / "tasks")
    teachers = _teachers(root, manifest, "t")
    cache_teachers(manifest.path, teachers, root / "cache.h5", views=1, dtype="float32", batch_size=6, workers=0,
                   device="cpu", log=lambda *a, **k: None, progress=False)
    # one task holding every category → one teacher
    names = [c["name"] for c in manifest.categories]
    (root / "one.yaml").write_text(yaml.safe_dump({"tasks": {"everything": names}}))
    split_tasks(train, val, str(root / "one.yaml"), root / "tasks1")
    one = TaskManifest(root / "tasks1")
    cache_teachers(one.path, _teachers(root, one, "one"), root / "cache1.h5", views=1, dtype="float16",
                   batch_size=6, workers=0, device="cpu", log=lambda *a, **k: None, progress=False)
    # the same images split another way: another manifest
    split_tasks(train, val, "balanced:2", root / "tasks-other")
    return {"root": root, "manifest": manifest, "teachers": teachers, "cache": root / "cache.h5",
            "cache1": root / "cache1.h5"}


def _cfg(setup, overrides=None) -> AmalgamateConfig:
    cache = TeacherCache(setup["cache"])
    return load_amalgamate_config(None, overrides, cache.layout.teacher_settings())


def _batch(cache: TeacherCache, n: int = 4):
    return collate_cached([cache[i] for i in range(n)])


def _student_from_teachers(setup, num_classes: int, compress: str = "none") -> Student:
    teachers = [load_checkpoint(p) for p in setup["teachers"]]
    student = Student(model_config(MODEL), num_classes, len(teachers), compress)
    sd = {n: v for n, v in teachers[0]["model"].items() if not n.startswith(("class_embed", "input_proj"))}
    for k, t in enumerate(teachers):
        sd.update({f"input_projs.{k}.{n[len('input_proj.'):]}": v for n, v in t["model"].items()
                   if n.startswith("input_proj.")})
    missing = student.load_state_dict(sd, strict=False).missing_keys
    assert all(m.startswith("class_embed") for m in missing)
    return student.eval()


def test_config_defaults_to_the_teachers_and_files_override_single_keys(setup, tmp_path):
    cfg = _cfg(setup)
    assert cfg.model.to_dict() == model_config(MODEL).to_dict()
    assert cfg.aug.eval_size == 64 and cfg.train.lr == 1e-3 and cfg.train.epochs == 4
    assert (cfg.method, cfg.compress, cfg.lambda_seq, cfg.lambda_task, cfg.lambda_d) == ("ka", "none", 1.0, 1.0, 0.1)
    assert cfg.ta.alpha == (1.0, 5.0, 2.0) and cfg.sa.enabled and cfg.ta.enabled
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"num_queries": 4}, "ta": {"topk": 3}, "lambda_d": 0.5}))
    cache = TeacherCache(setup["cache"])
    over = load_amalgamate_config(f, {"train.epochs": 2, "sa.enabled": False}, cache.layout.teacher_settings())
    assert over.model.num_queries == 4 and over.model.d_model == 32 and over.model.tiny_widths == (8, 8, 16, 16)
    assert (over.ta.topk, over.lambda_d, over.train.epochs, over.sa.enabled) == (3, 0.5, 2, False)
    f.write_text(yaml.safe_dump({"ta": {"treshold": 0.2}}))
    with pytest.raises(Exception, match="ta.treshold"):
        load_amalgamate_config(f, None, cache.layout.teacher_settings())


def test_sa_loss_is_zero_when_the_student_reproduces_the_teachers(setup):
    cache = TeacherCache(setup["cache"])
    images, mask, targets, teacher = batch = _batch(cache)
    C = len(cache.label_map["ids"])
    cfg = _cfg(setup)
    objective = AmalgamationObjective(cfg, C, 2, cache.layer_names, cache.class_index)
    assert cache.layer_names == ["proj", "enc1", "enc2"]
    same = objective(_student_from_teachers(setup, C), batch, torch.device("cpu"))
    for name in ("sa_proj", "sa_enc1", "sa_enc2", "loss_seq"):
        assert same[name].item() < 1e-8, (name, same[name].item())
    assert same["loss_task"].item() > 0 and same["loss_d"].item() > 0
    other = objective(Student(model_config(MODEL), C, 2).eval(), batch, torch.device("cpu"))
    assert other["loss_seq"].item() > 1.0
    assert other["total"].item() == pytest.approx(
        other["loss_seq"].item() + other["loss_task"].item() + 0.1 * other["loss_d"].item(), rel=1e-5)

    # compressed: tokens chosen from the teachers' projections, each layer's target gathered alike
    comp = _student_from_teachers(setup, C, "redundancy")
    out = comp(images, mask, teacher_proj=teacher["seqs"][:, :, 0])
    assert torch.equal(out["part_idx"], select_parts(teacher["seqs"][:, :, 0], out["enc_mask"], "redundancy"))
    assert len(out["part_idx"].unique()) == 2  # both teachers contribute tokens
    ccfg = _cfg(setup, {"compress": "redundancy"})
    closs = AmalgamationObjective(ccfg, C, 2, cache.layer_names, cache.class_index)(comp, batch, torch.device("cpu"))
    # the kept projected tokens are the teachers' own; the encoder then mixes tokens of both
    # teachers, so its layers no longer reproduce either teacher exactly
    assert closs["sa_proj"].item() < 1e-8
    assert closs["sa_enc1"].item() > 1e-3


def test_int8_cache_reaches_the_losses_as_floats(setup, tmp_path):
    """amalgamate reads an int8 cache without dequantising (int8 through the DataLoader); the
    objective dequantises the batch on the device: the losses equal those of the reader's own
    float batch, and the student reproducing the teachers is off by the rounding alone."""
    path = tmp_path / "int8.h5"
    cache_teachers(setup["manifest"].path, setup["teachers"], path, views=1, dtype="int8", batch_size=6, workers=0,
                   device="cpu", log=lambda *a, **k: None, progress=False)  # fmt: skip
    stored, floats = TeacherCache(path, dequantize=False), TeacherCache(path)
    C = len(stored.label_map["ids"])
    batch = _batch(stored)
    assert batch[3]["seqs"].dtype == torch.int8
    objective = AmalgamationObjective(_cfg(setup), C, 2, stored.layer_names, stored.class_index)
    student = _student_from_teachers(setup, C)
    got = objective(student, batch, torch.device("cpu"))
    want = objective(student, _batch(floats), torch.device("cpu"))
    for name in ("sa_proj", "sa_enc1", "sa_enc2", "loss_task", "total"):
        assert torch.equal(got[name], want[name]), name
    # Off by the rounding only, which SA's per-channel standardisation magnifies: these random
    # teachers' channels vary across tokens by about one int8 step (max|x|/127 of the token), so
    # the student reproducing them scores about 0.7 here (float16 storage: 0.002; an unrelated
    # student: above 1 per layer).
    assert 0 < got["loss_seq"].item() < 1.0, got["loss_seq"].item()


def test_compressed_projection_is_supervised_on_every_part(setup):
    """Evaluation picks tokens from the student's whole X_S, so SA on the projection covers the
    tokens compression drops too, not only the kept ones."""
    cache = TeacherCache(setup["cache"])
    C = len(cache.label_map["ids"])
    torch.manual_seed(0)
    student = Student(model_config(MODEL), C, 2, "redundancy")
    seen = {}
    student.register_forward_hook(lambda m, args, out: seen.update(out=out))
    objective = AmalgamationObjective(_cfg(setup, {"compress": "redundancy"}), C, 2, cache.layer_names,
                                      cache.class_index)
    losses = objective(student, _batch(cache), torch.device("cpu"))
    parts = seen["out"]["proj_parts"]  # (B, N, n, d)
    parts.retain_grad()
    losses["sa_proj"].backward()
    dropped = torch.ones(parts.shape[:3], dtype=torch.bool)
    dropped.scatter_(1, seen["out"]["part_idx"][:, None], False)
    assert dropped.sum() == parts.shape[0] * parts.shape[2]  # one of two parts dropped per position
    assert (parts.grad.abs().sum(-1)[dropped] > 0).all()


def test_compress_guide_hands_token_choice_to_the_student(setup):
    """compress_guide: the teachers' X_T picks the kept tokens in the first fraction of the
    epochs, the student's own X_S afterwards (as at evaluation)."""
    cache = TeacherCache(setup["cache"])
    C = len(cache.label_map["ids"])
    images, mask, targets, teacher = batch = _batch(cache)
    torch.manual_seed(0)
    student = Student(model_config(MODEL), C, 2, "redundancy")
    seen = {}
    student.register_forward_hook(lambda m, args, out: seen.update(out=out))
    objective = AmalgamationObjective(_cfg(setup, {"compress": "redundancy", "compress_guide": 0.5}), C, 2,
                                      cache.layer_names, cache.class_index)
    from_teachers = select_parts(teacher["seqs"][:, :, 0], None, "redundancy")
    picks = []
    for epoch in range(4):
        objective.set_epoch(epoch, 4)
        objective(student, batch, torch.device("cpu"))
        out = seen["out"]
        own = select_parts(out["proj_parts"].detach(), out["enc_mask"], "redundancy")
        picks.append(out["part_idx"])
        assert torch.equal(out["part_idx"], from_teachers if epoch < 2 else own), epoch
    assert not torch.equal(picks[0], picks[3])  # a random student disagrees with its teachers
    with pytest.raises(Exception, match="compress_guide"):
        _cfg(setup, {"compress_guide": 1.5})


def test_sag_projection_receives_gradients(setup):
    cache = TeacherCache(setup["cache"])
    C = len(cache.label_map["ids"])
    proj = SAGProjection(2, 32, 3)
    objective = AmalgamationObjective(_cfg(setup, {"method": "sag"}), C, 2, cache.layer_names, cache.class_index, proj)
    losses = objective(Student(model_config(MODEL), C, 1), _batch(cache), torch.device("cpu"))
    assert set(losses) >= {"sag_proj", "sag_enc1", "sag_enc2", "loss_seq", "loss_task", "loss_d"}
    losses["total"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["ka", "raw", "raw-ext", "sag"])
def test_each_method_lowers_its_loss(setup, tmp_path, monkeypatch, method):
    run = tmp_path / method
    start = {}  # sag: W_a as drawn, before training
    build = amalgamate_module.build_objective

    def recording(cfg, source, needs):
        objective = build(cfg, source, needs)
        if objective.sag_proj is not None:
            start["W_a"] = objective.sag_proj.weight.detach().clone()
        return objective

    monkeypatch.setattr(amalgamate_module, "build_objective", recording)
    result = amalgamate(setup["cache"], None, None, run, device="cpu", overrides={"method": method},
                        log=lambda *a, **k: None)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["total"] < 0.95 * rows[0]["total"], [r["total"] for r in rows]
    keys = set(rows[-1])
    assert {"loss_d", "loss_ce", "loss_bbox", "loss_giou", "AP", "per_task"} <= keys
    assert set(rows[-1]["per_task"]) == {"convex", "concave"}
    if method in ("ka", "sag"):
        assert {"loss_seq", "loss_task", "loss_ta_kl", "loss_ta_l1_0"} <= keys
        assert rows[-1]["loss_seq"] < rows[0]["loss_seq"]
    else:
        assert "loss_seq" not in keys and "loss_task" not in keys
    ck = load_checkpoint(run / "best.pt")
    assert ck["kind"] == ("detr" if method == "raw" else "student")
    assert ck["meta"]["method"] == method and ck["meta"]["cache"]["content_sha256"] == ck["inputs"]["cache"]
    assert ck["label_map"]["ids"] == TeacherCache(setup["cache"]).label_map["ids"]
    assert [t["sha256"] for t in ck["meta"]["cache"]["teachers"]] == [
        t["sha256"] for t in TeacherCache(setup["cache"]).attrs["teachers"]]
    if method in ("ka", "raw-ext"):
        assert ck["arch"]["num_parts"] == 2
    if method == "sag":  # W_a (random at the start) was optimised: it moved from where it started
        w = load_checkpoint(run / "last.pt")["extra_modules"][0]["weight"]
        assert w.shape == start["W_a"].shape == (3, 2, 32, 32)
        assert (w - start["W_a"]).abs().max() > 1e-3
    else:
        assert start == {}
    saved = load_config(run / "config.yaml", AmalgamateConfig)
    assert saved.method == method and saved.model.d_model == 32
    assert result["method"] == method


def test_compressed_ka_from_the_cli_and_its_checkpoint_evaluates(cli, setup, tmp_path, monkeypatch):
    run = tmp_path / "ka-red"
    calls = []
    monkeypatch.setattr(AmalgamationObjective, "set_epoch",
                        lambda self, epoch, epochs: calls.append((epoch, epochs)))
    r = cli("amalgamate", "--cache", setup["cache"], "--tasks", setup["manifest"].path, "--compress", "redundancy",
            "--compress-guide", 0.5, "--epochs", 2, "--batch-size", 6, "--gt-weight", 0.5, "--device", "cpu",
            "--out", run)
    assert r.exit_code == 0, r.stderr
    assert calls == [(0, 2), (1, 2)]  # the trainer tells the objective every epoch
    ck = load_checkpoint(run / "last.pt")
    assert ck["arch"]["compress"] == "redundancy" and ck["meta"]["weights"]["lambda_d"] == 0.5
    assert ck["config"]["compress_guide"] == 0.5
    assert [row["steps"] for row in _rows(run)] == [2, 2]
    model = build_model(ck).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out["enc_proj"].shape == (1, 16, 32)
    ev = tmp_path / "eval.json"
    r = cli("eval", "--model", run, "--tasks", setup["manifest"].path, "--json", ev)
    assert r.exit_code == 0, r.stderr
    assert json.loads(ev.read_text())["method"] == "ka"
    # the run folder is not reused by accident
    r = cli("amalgamate", "--cache", setup["cache"], "--out", run)
    assert_one_line_error(r, "--resume", "--force")


def test_bad_input_is_one_line(cli, setup, tmp_path):
    cache, out = setup["cache"], tmp_path / "never"
    r = cli("amalgamate", "--cache", cache, "--tasks", setup["root"] / "tasks-other" / "tasks.yaml", "--out", out)
    assert_one_line_error(r, "another task manifest")
    r = cli("amalgamate", "--cache", cache, "--no-sa", "--no-ta", "--gt-weight", 0, "--out", out)
    assert_one_line_error(r, "nothing to learn")
    cfg = tmp_path / "wide.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"d_model": 64}}))
    r = cli("amalgamate", "--cache", cache, "--config", cfg, "--out", out)
    assert_one_line_error(r, "d_model 64 differs from the cached teachers' 32")
    cfg.write_text(yaml.safe_dump({"model": {"enc_layers": 3}}))
    r = cli("amalgamate", "--cache", cache, "--config", cfg, "--out", out)
    assert_one_line_error(r, "enc_layers 3 differs from the cached teachers' 2")
    r = cli("amalgamate", "--cache", setup["cache1"], "--compress", "isometric", "--out", out)
    assert_one_line_error(r, "needs at least 2 teachers")
    r = cli("amalgamate", "--cache", cache, "--method", "raw", "--compress", "random", "--out", out)
    assert_one_line_error(r, "extended student")
    r = cli("amalgamate", "--cache", cache, "--method", "kd", "--out", out)
    assert_one_line_error(r, "method")
    r = cli("amalgamate", "--cache", cache, "--compress", "redundancy", "--compress-guide", 1.5, "--out", out)
    assert_one_line_error(r, "compress_guide")
    cfg.write_text(yaml.safe_dump({"sa": {"normalise": True}}))
    r = cli("amalgamate", "--cache", cache, "--config", cfg, "--out", out)
    assert_one_line_error(r, "sa.normalise")
    r = cli("amalgamate", "--cache", tmp_path / "missing.h5", "--out", out)
    assert_one_line_error(r, "missing.h5")
    assert not out.exists()


def test_a_cache_of_another_split_than_train_is_refused_unless_allowed(cli, setup, tmp_path):
    """A cache of the validation split (or any split but train) would train the student on the
    images it is evaluated on: refused, one line naming the cache, nothing written; --allow-val
    trains on it."""
    import shutil

    import h5py

    val = tmp_path / "val.h5"
    cache_teachers(setup["manifest"].path, setup["teachers"], val, split="val", views=1, dtype="float16",
                   batch_size=4, workers=0, device="cpu", log=lambda *a, **k: None, progress=False)
    assert TeacherCache(val).attrs["split"] == "val"
    other = tmp_path / "other.h5"
    shutil.copy(val, other)
    with h5py.File(other, "r+") as f:
        f.attrs["split"] = "test"
    run = tmp_path / "run"
    args = ["--method", "raw", "--epochs", 1, "--batch-size", 4, "--device", "cpu", "--out", run]
    assert_one_line_error(cli("amalgamate", "--cache", val, *args), f"{val}: cache holds the 'val' split",
                          "--allow-val")
    assert_one_line_error(cli("amalgamate", "--cache", other, *args), f"{other}: cache holds the 'test' split")
    assert not run.exists()
    r = cli("amalgamate", "--cache", val, "--allow-val", *args)
    assert r.exit_code == 0, r.stderr
    rows = _rows(run)
    assert [(row["epoch"], row["steps"]) for row in rows] == [(1, 1)]  # the 4 validation images, one batch
    assert load_checkpoint(run / "last.pt")["meta"]["cache"]["path"] == str(val.resolve())


def test_cache_content_id_names_the_content_not_the_path(setup, tmp_path):
    """Runs record the cache by its content signature (no pass over a file of many GiB): a copy
    has the same id, another cache another one."""
    import shutil

    from kacli.cache.schema import content_id

    def ident(path):
        return content_id(TeacherCache(path).attrs, Path(path).stat().st_size)

    copy = tmp_path / "copy.h5"
    shutil.copy(setup["cache"], copy)
    assert ident(copy) == ident(setup["cache"]) != ident(setup["cache1"])
    attrs = dict(TeacherCache(setup["cache"]).attrs)
    assert content_id({**attrs, "seed": attrs["seed"] + 1}, copy.stat().st_size) != ident(copy)


def test_teachers_settings_come_from_the_cache_when_their_checkpoints_are_gone(setup, tmp_path):
    """cache-teachers records the first teacher's architecture and training settings, so the
    student's defaults need no teacher checkpoint: deleted after caching, they are not missed."""
    import shutil

    copies = []
    for p in setup["teachers"]:
        copies.append(tmp_path / p.name)
        shutil.copy(p, copies[-1])
    path = tmp_path / "cache.h5"
    cache_teachers(setup["manifest"].path, copies, path, views=1, dtype="float16", batch_size=6, workers=0,
                   device="cpu", log=lambda *a, **k: None, progress=False)  # fmt: skip
    attrs = TeacherCache(path).attrs
    # the settings the first teacher's checkpoint holds (how caches without the attribute are read)
    from_checkpoint = teacher_settings({k: v for k, v in attrs.items() if k != "teacher_settings"})
    assert from_checkpoint["model"] == model_config(MODEL).to_dict() and from_checkpoint["train"] == TRAIN
    for p in copies:
        p.unlink()
    assert teacher_settings({k: v for k, v in attrs.items() if k != "teacher_settings"}) == {"aug": AUG}
    assert attrs["teacher_settings"] == {"model": model_config(MODEL).to_dict(), "train": TRAIN}
    assert teacher_settings(attrs) == from_checkpoint

    run = tmp_path / "run"
    amalgamate(path, None, None, run, device="cpu", overrides={"train.epochs": 1}, log=lambda *a, **k: None)
    saved = load_config(run / "config.yaml", AmalgamateConfig)
    assert saved.model.to_dict() == model_config(MODEL).to_dict()
    assert (saved.train.lr, saved.train.batch_size, saved.train.lr_drop, saved.train.eval_every) == (1e-3, 4, 1000, 100)
    assert saved.aug.eval_size == 64 and saved.aug.crop_p == 0.0


def test_teachers_moved_away_needs_the_model_in_the_config(cli, setup, tmp_path):
    """A cache written before the teachers' settings were recorded in it (no ``teacher_settings``
    attribute) whose teacher checkpoints are gone: the student's model must be given."""
    import shutil

    import h5py

    moved = tmp_path / "moved.h5"
    shutil.copy(setup["cache"], moved)
    with h5py.File(moved, "r+") as f:
        teachers = json.loads(f.attrs["teachers"])
        for t in teachers:
            t["checkpoint"] = str(tmp_path / "gone" / Path(t["checkpoint"]).name)
        f.attrs["teachers"] = json.dumps(teachers)
        del f.attrs["teacher_settings"]
    r = cli("amalgamate", "--cache", moved, "--out", tmp_path / "run")
    assert_one_line_error(r, "architecture is unknown", "model:")
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {**MODEL, "d_model": 16}}))
    r = cli("amalgamate", "--cache", moved, "--config", cfg, "--out", tmp_path / "run")
    assert_one_line_error(r, "d_model 16 differs")  # the config's model is the one checked
