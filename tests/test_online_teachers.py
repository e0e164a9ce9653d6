"""``kacli amalgamate --teacher …``: the teachers run in the training loop instead of a cache.

Eight 96-px demo images split into two tasks, tiny random teachers; views of 48 or 64 px so that
a batch mixes sizes and pads. The cache written from the same teachers is the reference: on the
same views, the online teachers must give the objective the same dict and so the same losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from kacli.amalgamate import amalgamate, build_student
from kacli.amalgamation.config import load_amalgamate_config
from kacli.amalgamation.objective import AmalgamationObjective
from kacli.cache.reader import TeacherCache, collate_cached
from kacli.cache.writer import cache_teachers
from kacli.data.demo_data import make_demo_data
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks
from kacli.engine.train import param_groups
from kacli.fsutil import sha256_file
from kacli.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from kacli.models.config import model_config
from kacli.models.detr import DETR
from kacli.teachers.load import load_teachers
from kacli.teachers.online import OnlineTeachers

MODEL = {"backbone": "tiny", "tiny_widths": [8, 8, 16, 16], "d_model": 32, "nheads": 4, "enc_layers": 2,
         "dec_layers": 1, "dim_feedforward": 64, "dropout": 0.0, "num_queries": 6, "pre_norm": True}
AUG = {"scales": [48, 64], "max_size": 64, "crop_scales": [64], "crop_min": 48, "crop_max": 64, "crop_p": 0.0,
       "flip_p": 0.5, "eval_size": 64}
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000, "workers": 0,
         "eval_every": 100, "seed": 0}
BATCH = 4
CPU = torch.device("cpu")


def _teacher(path: Path, label_map: dict, seed: int, arch: str = "detr") -> Path:
    cfg = model_config({**MODEL, "arch": arch})
    torch.manual_seed(seed)
    model = DETR(cfg, len(label_map["ids"]))
    save_checkpoint(path, {"kind": "detr", "arch": cfg.to_dict(), "label_map": label_map, "task": None,
                           "model": model.state_dict(), "config": {"model": cfg.to_dict(), "aug": AUG, "train": TRAIN}})
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two tasks, their teachers ``t`` and a float32 cache of 2 views per image; ``wide``: the
    second task's teacher replaced by one whose head has an extra class and the task's classes
    in reverse order (a ``class_map`` teacher), with its own cache."""
    root = tmp_path_factory.mktemp("online")
    make_demo_data(root / "data", train_images=8, val_images=2, seed=5, size=96, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "val.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks")  # fmt: skip
    manifest = TaskManifest(root / "tasks")
    maps = [t.label_map() for t in manifest.tasks]
    teachers = [_teacher(root / f"t{k}.pt", lm, k) for k, lm in enumerate(maps)]
    wide_map = {"ids": [999, *maps[1]["ids"][::-1]], "names": ["unicorn", *maps[1]["names"][::-1]]}
    wide = [teachers[0], _teacher(root / "wide.pt", wide_map, 7)]
    quiet = dict(views=2, dtype="float32", batch_size=BATCH, workers=0, device="cpu", log=lambda *a, **k: None,
                 progress=False)
    cache_teachers(manifest.path, teachers, root / "cache.h5", **quiet)
    cache_teachers(manifest.path, wide, root / "wide.h5", **quiet)
    # mixed classifiers: the first task's DETR teacher beside a Conditional DETR teacher of the second
    mixed = [teachers[0], _teacher(root / "cond.pt", maps[1], 11, arch="conditional")]
    cache_teachers(manifest.path, mixed, root / "mixed.h5", **quiet)
    return {"root": root, "manifest": manifest, "teachers": teachers, "wide": wide, "cache": root / "cache.h5",
            "wide_cache": root / "wide.h5", "maps": maps, "mixed": mixed, "mixed_cache": root / "mixed.h5"}


def _objectives(cache: TeacherCache, teachers: list[Path], manifest: TaskManifest, overrides: dict):
    """The same configuration's objective twice: reading the batch's teacher dict, and running the
    teachers online; and the student (fixed seed)."""
    cfg = load_amalgamate_config(None, overrides, cache.layout.teacher_settings())
    needs = AmalgamationObjective.needs(cfg, cache.layer_names)
    C = len(cache.label_map["ids"])
    cached = AmalgamationObjective(cfg, C, 2, needs.layers, cache.class_index)
    online = OnlineTeachers.from_teachers(load_teachers(manifest, teachers), needs.layers)
    live = AmalgamationObjective(cfg, C, 2, needs.layers, cache.class_index, teachers=online)
    torch.manual_seed(0)
    return cached, live, build_student(cfg, C, 2).train(), needs


@pytest.mark.parametrize("case", ["ka", "ka-redundancy", "class-map", "mixed", "mixed-conditional-student"])
def test_online_teachers_give_the_cached_losses_on_the_same_views(env, case):
    path, teachers = {"class-map": (env["wide_cache"], env["wide"]), "mixed": (env["mixed_cache"], env["mixed"]),
                      "mixed-conditional-student": (env["mixed_cache"], env["mixed"])}.get(case, (env["cache"], env["teachers"]))
    overrides = {"compress": "redundancy"} if case == "ka-redundancy" else {}
    if case == "mixed-conditional-student":
        overrides = {"model.arch": "conditional", "compress": "redundancy"}
    cache = TeacherCache(path, layers="all")
    images, mask, targets, teacher = batch = collate_cached([cache[i] for i in range(BATCH)])  # one cache batch
    assert {tuple(im.shape) for im, _, _ in (cache[i] for i in range(BATCH))} == {(3, 48, 48), (3, 64, 64)}
    assert teacher["token_mask"].any()  # a 48-px view padded to 64: masked tokens
    cached, live, student, needs = _objectives(cache, teachers, env["manifest"], overrides)
    assert needs.teacher

    # the dict itself: what collate_cached gives for the needed layers
    run = live.teachers(images, mask)
    want = {**teacher, "seqs": teacher["seqs"][:, :, [cache.layer_names.index(n) for n in needs.layers]]}
    assert run["seqs"].dtype == torch.float32 and run["seqs"].shape == want["seqs"].shape
    torch.testing.assert_close(run["seqs"], want["seqs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(run["token_mask"], want["token_mask"])
    for k in range(2):
        assert run["logits"][k].shape == want["logits"][k].shape
        torch.testing.assert_close(run["logits"][k], want["logits"][k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run["boxes"][k], want["boxes"][k], rtol=1e-5, atol=1e-5)
    if case == "class-map":
        assert run["logits"][1].shape[-1] == len(env["maps"][1]["ids"]) + 1  # remapped: task classes + no-object
    if case.startswith("mixed"):
        # the cache names each teacher's classifier, and stores the Conditional teacher's sigmoids as
        # the distribution q_c = σ_c / max(1, Σσ), no object 1 − Σq (teachers/labels.py), computed here by hand
        assert [(t["arch"], t["classifier"]) for t in cache.attrs["teachers"]] == [
            ("detr", "softmax"), ("conditional", "sigmoid")]
        with torch.no_grad():
            p = live.teachers.models[1](images, mask)["pred_logits"].sigmoid()
        q = p / p.sum(-1, keepdim=True).clamp(min=1)
        want_q = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp(min=1e-12)], dim=-1)
        torch.testing.assert_close(teacher["logits"][1].exp(), want_q, rtol=1e-5, atol=1e-6)
        assert student.classifier == ("sigmoid" if case == "mixed-conditional-student" else "softmax")

    cached_batch = (images, mask, targets, {**teacher, "seqs": want["seqs"]})
    a = cached(student, cached_batch, CPU)
    b = live(student, (images, mask, targets, None), CPU)
    assert set(a) == set(b) and {"loss_d", "total"} <= set(a)
    if case != "ka-redundancy":
        assert {"loss_seq", "loss_task", "sa_proj", "sa_enc2"} <= set(a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_online_teachers_stay_frozen_through_training_steps(env):
    cache = TeacherCache(env["cache"])
    _, live, student, _ = _objectives(cache, env["teachers"], env["manifest"], {})
    before = {k: v.clone() for k, v in live.teachers.state_dict().items()}
    live.train()
    student.train()
    assert not live.teachers.training and not any(m.training for m in live.teachers.modules())
    assert not any(p.requires_grad for p in live.teachers.parameters())
    optimizer = torch.optim.AdamW(param_groups(student, 1e-2, 1e-2), lr=1e-2)
    teacher_ids = {id(p) for p in live.teachers.parameters()}
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    images, mask, targets, _ = collate_cached([cache[i] for i in range(BATCH)])
    for _ in range(2):
        losses = live(student, (images, mask, targets, None), CPU)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    assert all(p.grad is None for p in live.teachers.parameters())
    after = live.teachers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in live.teachers.modules())


def _cli_args(env, out, *teachers, extra=()):
    args = ["amalgamate", "--tasks", env["manifest"].path, "--out", out, "--epochs", 1, "--device", "cpu"]
    for t in teachers:
        args += ["--teacher", t]
    return [*args, *extra]


def test_cli_trains_with_online_teachers_and_records_them(cli, env, tmp_path):
    run = tmp_path / "run"
    r = cli(*_cli_args(env, run, *env["teachers"]))
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1] and rows[0]["steps"] == 2  # 8 images (one view each), batch 4
    assert {"loss_seq", "loss_task", "loss_d"} <= set(rows[0])
    ck = load_checkpoint(run / "last.pt")
    shas = [sha256_file(p) for p in env["teachers"]]
    assert ck["inputs"] == {"tasks.yaml": env["manifest"].sha256, "teachers": shas}
    assert ck["meta"]["teacher_source"] == "online" and "cache" not in ck["meta"]
    online = ck["meta"]["online"]
    assert [t["sha256"] for t in online["teachers"]] == shas
    assert [t["task"] for t in online["teachers"]] == env["manifest"].task_names
    assert online["layers"] == ["proj", "enc1", "enc2"]
    # the checkpoint holds the student alone
    student = build_model(ck)
    assert set(ck["model"]) == set(student.state_dict()) and ck.get("extra_modules") == []
    assert ck["label_map"] == env["manifest"].student_label_map()
    # --resume refuses other teachers (the run's files untouched), continues with the same ones
    def files():
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = files()
    r = cli(*_cli_args(env, run, *env["wide"], extra=["--resume", "--epochs", 2]))
    assert_one_line_error(r, "another run", "teachers")
    assert files() == before
    r = cli(*_cli_args(env, run, *env["teachers"], extra=["--resume", "--epochs", 2]))
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # nor does a run from the cache resume it
    before = files()
    r = cli("amalgamate", "--cache", env["cache"], "--out", run, "--resume", "--epochs", 3, "--device", "cpu")
    assert_one_line_error(r, "another run")
    assert files() == before


def test_online_teachers_import_nothing_from_the_cache(env, tmp_path):
    """``kacli amalgamate --teacher`` trains without loading any kacli.cache module."""
    args = [str(a) for a in _cli_args(env, tmp_path / "run", *env["teachers"])]
    code = ("import sys\nfrom kacli.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('kacli.cache')))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").is_file()
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_bad_teacher_input_is_one_line_and_writes_nothing(cli, env, tmp_path):
    out = tmp_path / "never"
    t1, t2 = env["teachers"]
    listed = sorted(tmp_path.iterdir())
    r = cli("amalgamate", "--cache", env["cache"], "--teacher", t1, "--teacher", t2, "--out", out)
    assert_one_line_error(r, "--cache", "--teacher", "not both")
    r = cli("amalgamate", "--out", out)
    assert_one_line_error(r, "--cache", "--teacher")
    r = cli("amalgamate", "--teacher", t1, "--teacher", t2, "--out", out)
    assert_one_line_error(r, "--tasks")
    r = cli(*_cli_args(env, out, t2, t1))
    assert_one_line_error(r, "wrong order")
    r = cli(*_cli_args(env, out, t1))
    assert_one_line_error(r, "one --teacher per task", "got 1")
    odd = _teacher(tmp_path / "odd.pt", {"ids": [998], "names": ["griffin"]}, 3)
    r = cli(*_cli_args(env, out, t1, odd))
    assert_one_line_error(r, "odd.pt", "label map is not task")
    assert sorted(tmp_path.iterdir()) == [*listed, tmp_path / "odd.pt"]  # no run folder, no temporary one


def test_library_refuses_both_and_neither_sources(env, tmp_path):
    from kacli.errors import KacliError

    with pytest.raises(KacliError, match="not both"):
        amalgamate(env["cache"], None, None, tmp_path / "x", teachers=env["teachers"])
    with pytest.raises(KacliError, match="--teacher"):
        amalgamate(None, env["manifest"].path, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("overrides, teacher", [
    ({"method": "raw-ext", "gt_loss": "pseudo-gt", "lambda_d": 0.0}, True),  # raw-ext's GT loss has weight 1 anyway
    ({"method": "raw-ext"}, False),
    ({"sa.enabled": False, "ta.enabled": False, "gt_loss": "pseudo-gt"}, True),
    ({"sa.enabled": False, "ta.enabled": False, "compress": "redundancy", "compress_guide": 0.0}, False),
])
def test_what_a_method_needs_is_what_its_objective_reads(env, overrides, teacher):
    """needs() (what the cache reader or the online teachers provide) and the objective's own
    needs_teacher agree, so a batch never lacks the teachers' outputs a loss reads."""
    cache = TeacherCache(env["cache"], layers="all")
    cfg = load_amalgamate_config(None, overrides, cache.layout.teacher_settings())
    needs = AmalgamationObjective.needs(cfg, cache.layer_names)
    objective = AmalgamationObjective(cfg, len(cache.label_map["ids"]), 2, needs.layers, cache.class_index)
    assert needs.teacher == objective.needs_teacher == teacher
    if "compress_guide" in overrides:  # unguided compression reads no proj: a cache without it serves
        assert AmalgamationObjective.needs(cfg, ["enc1", "enc2"]).layers == ["enc1"]
