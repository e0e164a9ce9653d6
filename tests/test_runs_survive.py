"""Nothing already written is lost: --force, kills at the worst moments, and resume.

Every failure here must leave an existing run byte for byte as it was (sha256 of every file),
print one line naming the file at fault, and exit with code 2. The kill tests run the real
command in a subprocess that kills itself with SIGKILL at a named point (``KACLI_KILL_AT``,
:func:`kacli.engine.rundir.kill_point`), then check what a rerun or ``--resume`` makes of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import assert_one_line_error
from kacli.cache.writer import cache_teachers
from kacli.data.demo_data import make_demo_data
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks
from kacli.models.checkpoint import load_checkpoint
from test_amalgamate import AUG, MODEL, _teachers

ROOT = Path(__file__).resolve().parents[1]
# 8 training images viewed at 64 px, batches of 2: 4 steps per epoch, each epoch validated.
TRAIN = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000, "workers": 0,
         "eval_every": 1, "seed": 0}


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Hidden staging or set-aside folders beside a run folder."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def one_line(result, *needles: str) -> str:
    """One line (under 200 characters besides the paths it names), exit 2, no traceback."""
    err = assert_one_line_error(result, *needles)
    assert len(re.sub(r"/\S+", "PATH", err)) < 200, err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo data split in two tasks, a run config, random teachers and their cache; a finished
    teacher run and a finished student run to protect."""
    root = tmp_path_factory.mktemp("survive")
    make_demo_data(root / "data", train_images=8, val_images=4, seed=5, size=96, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "val.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks")
    manifest = TaskManifest(root / "tasks")
    (root / "run.yaml").write_text(yaml.safe_dump({"model": MODEL, "aug": AUG, "train": TRAIN}))
    teachers = _teachers(root, manifest, "t")
    cache_teachers(manifest.path, teachers, root / "cache.h5", views=1, dtype="float32", batch_size=4, workers=0,
                   device="cpu", log=lambda *a, **k: None, progress=False)
    return {"root": root, "tasks": manifest.path, "cache": root / "cache.h5", "cfg": root / "run.yaml"}


def teacher_args(world, out: Path, *extra) -> list:
    return ["train-teacher", "--tasks", world["tasks"], "--task", "convex", "--config", world["cfg"],
            "--out", out, *extra]


def student_args(world, out: Path, *extra) -> list:
    return ["amalgamate", "--cache", world["cache"], "--epochs", 1, "--out", out, *extra]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A finished teacher run and a finished student run (copied by each test that risks them)."""
    from typer.testing import CliRunner

    from kacli.cli import app

    root = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    for name, args in (("teacher", teacher_args), ("student", student_args)):
        r = runner.invoke(app, [str(a) for a in args(world, root / name)], catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
    return root


def existing(runs: Path, kind: str, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / kind
    shutil.copytree(runs / kind, out)
    (out / "notes.txt").write_text("kept by the user\n")
    return out, tree(out)


def kacli(*args, kill_at: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """The real command in its own process (``python -m kacli``), optionally killed at a point."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KACLI_KILL_AT", None)
    if kill_at:
        env["KACLI_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "kacli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


# -- item: --force checks everything before it replaces a run ------------------------------------------


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _nan_cache(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        logits = f["teachers/1/logits"]
        row = logits[3]
        row[0, 0] = np.nan
        logits[3] = row
    return dst


def _corrupt_image_world(world, tmp_path: Path) -> dict:
    """The world's data with one training image's bytes replaced after the cache was written."""
    data = tmp_path / "data"
    shutil.copytree(world["root"] / "data", data)
    split_tasks(str(data / "train.json"), str(data / "val.json"), str(data / "tasks-2.yaml"), tmp_path / "tasks")
    manifest = TaskManifest(tmp_path / "tasks")
    teachers = _teachers(tmp_path, manifest, "t")
    cache_teachers(manifest.path, teachers, tmp_path / "cache.h5", views=1, dtype="float32", batch_size=4,
                   workers=0, device="cpu", log=lambda *a, **k: None, progress=False)
    coco = json.loads((tmp_path / "tasks" / "train" / "all.json").read_text())
    bad = manifest.image_root("train") / coco["images"][2]["file_name"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return {"tasks": manifest.path, "cache": tmp_path / "cache.h5", "cfg": world["cfg"], "image": bad}


@pytest.mark.parametrize("case", ["init", "image-teacher", "backbone", "nan-cache", "image-student"])
def test_force_keeps_the_old_run_when_an_input_is_bad(cli, world, runs, tmp_path, case):
    kind = "teacher" if case in ("init", "image-teacher") else "student"
    out, before = existing(runs, kind, tmp_path)
    # (3 epochs: the new run's config.yaml differs from the old one's)
    if case == "init":
        bad = _truncated(runs / "teacher" / "best.pt", tmp_path / "init.pt")
        r = cli(*teacher_args(world, out, "--force", "--epochs", 3, "--init", bad))
    elif case == "backbone":
        bad = _truncated(runs / "teacher" / "best.pt", tmp_path / "backbone.pt")
        r = cli(*student_args(world, out, "--force", "--epochs", 3, "--backbone-weights", bad))
    elif case == "nan-cache":
        bad = _nan_cache(world["cache"], tmp_path / "nan.h5")
        r = cli("amalgamate", "--cache", bad, "--epochs", 3, "--out", out, "--force")
    else:
        w = _corrupt_image_world(world, tmp_path / "w")
        bad = w["image"]
        if kind == "teacher":
            r = cli(*teacher_args(w, out, "--force", "--epochs", 3))
        else:
            r = cli("amalgamate", "--cache", w["cache"], "--epochs", 3, "--out", out, "--force")
    one_line(r, bad.name)
    assert tree(out) == before
    assert leftovers(out) == []


def test_force_replaces_the_run_and_keeps_the_users_files(cli, world, runs, tmp_path):
    out, before = existing(runs, "teacher", tmp_path)
    old_id = load_checkpoint(out / "last.pt")["train_state"]["run_id"]
    r = cli(*teacher_args(world, out, "--force", "--epochs", 1))
    assert r.exit_code == 0, r.stderr
    after = tree(out)
    assert after["notes.txt"] == before["notes.txt"]
    assert load_checkpoint(out / "last.pt")["train_state"]["run_id"] != old_id
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_loses_nothing(world, runs, tmp_path):
    """--force killed in its first epoch: the old run is intact; a new run killed there leaves no
    half folder, so a plain rerun starts it."""
    out, before = existing(runs, "teacher", tmp_path)
    r = kacli(*teacher_args(world, out, "--force"), kill_at="step@1.2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert tree(out) == before
    fresh = tmp_path / "fresh"
    r = kacli(*teacher_args(world, fresh), kill_at="step@1.2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not fresh.exists()
    r = kacli(*teacher_args(world, fresh, "--epochs", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (fresh / "best.pt").is_file() and (fresh / "last.pt").is_file()
    assert leftovers(fresh) == []


@pytest.mark.slow
def test_a_kill_inside_the_swap_puts_the_old_run_back(world, runs, tmp_path):
    out, before = existing(runs, "teacher", tmp_path)
    r = kacli(*teacher_args(world, out, "--force", "--epochs", 1), kill_at="swap")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()  # killed between the two renames
    r = kacli(*teacher_args(world, out))  # the next start finds the old run back in place
    assert r.returncode == 2 and "not empty" in r.stderr
    assert tree(out) == before
    assert leftovers(out) == []


# -- item: best.pt and last.pt always agree after --resume ---------------------------------------------


def _config(world, tmp_path: Path, **train) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "aug": AUG, "train": {**TRAIN, **train}}))
    return path


def _teacher(world, cfg: Path, out: Path, *extra) -> list:
    return ["train-teacher", "--tasks", world["tasks"], "--task", "convex", "--config", cfg, "--out", out, *extra]


def _same_checkpoint(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["train_state"]["epoch"] == y["train_state"]["epoch"]
    assert x["train_state"]["best"] == y["train_state"]["best"]
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), (a.name, k)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("train, kill_epoch", [({"epochs": 3, "checkpoint_every": 2}, 1), ({"epochs": 2, "eval_every": 0}, 2)],
                         ids=["earlier-best", "last-epoch"])
def test_a_kill_between_best_and_last_is_redone_on_resume(world, tmp_path, train, kill_epoch):
    """Killed after best.pt and before last.pt, at an earlier best epoch (the first validation is
    always best; a step checkpoint already put the run in place) or in the final epoch (no
    validation: every epoch saves best.pt), --resume ends with the best.pt and last.pt of a run
    never killed."""
    cfg = _config(world, tmp_path, **train)
    epochs = train["epochs"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert kacli(*_teacher(world, cfg, straight)).returncode == 0
    r = kacli(*_teacher(world, cfg, run), kill_at=f"between-checkpoints@{kill_epoch}")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = kacli(*_teacher(world, cfg, run, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    _same_checkpoint(straight / "best.pt", run / "best.pt")
    _same_checkpoint(straight / "last.pt", run / "last.pt")
    assert [x["epoch"] for x in _rows(run)] == list(range(1, epochs + 1))


# -- item: step checkpoints, resumable mid-epoch; leftovers of a killed save ---------------------------


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_from_the_step_checkpoint(world, tmp_path):
    """train.checkpoint_every 2 (of 4 steps an epoch): killed at step 3 of epoch 2, --resume
    continues from step 2 and ends with the weights and metrics of a run never killed."""
    cfg = _config(world, tmp_path, checkpoint_every=2)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert kacli(*_teacher(world, cfg, straight)).returncode == 0
    r = kacli(*_teacher(world, cfg, run), kill_at="step@2.3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = load_checkpoint(run / "last.pt")["train_state"]
    assert (state["epoch"], state["step"]) == (1, 2)
    (run / ".last.pt.tmp-abc123.pt").write_bytes(b"")  # what a kill during torch.save leaves
    r = kacli(*_teacher(world, cfg, run, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    _same_checkpoint(straight / "last.pt", run / "last.pt")
    _same_checkpoint(straight / "best.pt", run / "best.pt")
    a, b = _rows(straight), _rows(run)
    assert [x["epoch"] for x in b] == [1, 2] and [x["steps"] for x in b] == [4, 4]
    assert [x["total"] for x in b] == pytest.approx([x["total"] for x in a], rel=1e-6)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv", "metrics.jsonl"]


# -- item: hostile flags and data end in one line, before anything is written --------------------------


def _huge_png(path: Path, w: int = 20000, h: int = 20000) -> Path:
    """A PNG whose header declares w×h pixels (its data is one pixel: nothing is ever decoded)."""
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:20], b[20:24] = w.to_bytes(4, "big"), h.to_bytes(4, "big")  # IHDR width, height
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("lr, needle", [("nan", "finite"), ("inf", "finite"), ("1e12", "diverged")])
def test_an_absurd_learning_rate_is_one_line(cli, world, runs, tmp_path, lr, needle):
    out, before = existing(runs, "teacher", tmp_path)
    one_line(cli(*teacher_args(world, out, "--force", "--lr", lr)), needle)
    assert tree(out) == before and leftovers(out) == []


def test_a_nan_weight_is_refused(cli, world, runs, tmp_path):
    out, before = existing(runs, "student", tmp_path)
    one_line(cli(*student_args(world, out, "--force", "--gt-weight", "nan")), "lambda_d", "finite")
    assert tree(out) == before


def test_a_split_without_images_is_refused_by_split_tasks(cli, world, tmp_path):
    empty = tmp_path / "empty.json"
    coco = json.loads((world["root"] / "data" / "val.json").read_text())
    empty.write_text(json.dumps({**coco, "images": [], "annotations": []}))
    out = tmp_path / "tasks"
    one_line(cli("split-tasks", "--train", world["root"] / "data" / "train.json", "--val", empty,
                 "--scheme", world["root"] / "data" / "tasks-2.yaml", "--out", out), "empty.json", "no images")
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_oversized_image_is_named_even_from_a_worker(cli, world, runs, tmp_path, workers):
    """A 20000×20000 PNG in the split (and, with --workers 2, read in a DataLoader worker)."""
    w = _corrupt_image_world(world, tmp_path / "w")
    _huge_png(w["image"])
    out, before = existing(runs, "teacher", tmp_path)
    err = one_line(cli(*teacher_args(w, out, "--force", "--workers", workers)), w["image"].name,
                   "20000x20000", "KACLI_MAX_IMAGE_PIXELS")
    assert "Caught" not in err and "worker" not in err
    assert tree(out) == before


def test_a_corrupt_image_in_a_cache_worker_is_one_line(cli, world, tmp_path):
    """cache-teachers decodes in 2 worker processes by default."""
    w = _corrupt_image_world(world, tmp_path / "w")
    teachers = [tmp_path / "w" / "t-convex.pt", tmp_path / "w" / "t-concave.pt"]
    out = tmp_path / "cache.h5"
    out.write_bytes(b"an older file")
    err = one_line(cli("cache-teachers", "--tasks", w["tasks"], *[a for t in teachers for a in ("--teacher", t)],
                       "--out", out, "--device", "cpu", "--force"), w["image"].name, "not a readable image")
    assert "Caught" not in err
    assert out.read_bytes() == b"an older file"


def test_predict_refuses_an_oversized_image_and_size(cli, runs, tmp_path):
    big = _huge_png(tmp_path / "big.png")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "predictions.json").write_text("{}")
    model = runs / "teacher"
    one_line(cli("predict", "--model", model, big, "--out", out, "--force"), "big.png", "KACLI_MAX_IMAGE_PIXELS")
    small = tmp_path / "small.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(small)
    one_line(cli("predict", "--model", model, small, "--out", out, "--force", "--size", 60000),
             "--size", "KACLI_MAX_IMAGE_SIDE")
    assert tree(out) == {"predictions.json": hashlib.sha256(b"{}").hexdigest()}


@pytest.mark.parametrize("flag, value, needle", [("--batch-size", 0, "--batch-size"), ("--size", 100000, "KACLI_MAX_IMAGE_SIDE"),
                                                 ("--size", 0, "at least 1"), ("--max-size", 0, "at least 1")])
def test_eval_refuses_absurd_sizes_before_running(cli, world, runs, tmp_path, flag, value, needle):
    out = tmp_path / "eval.json"
    out.write_text("{}")
    one_line(cli("eval", "--model", runs / "teacher", "--tasks", world["tasks"], flag, value, "--json", out, "--force"),
             flag, needle)
    assert out.read_text() == "{}"


def test_cache_teachers_refuses_absurd_views_before_allocating(cli, world, tmp_path):
    teachers = [world["root"] / "t-convex.pt", world["root"] / "t-concave.pt"]
    out = tmp_path / "cache.h5"
    shutil.copy(world["cache"], out)
    before = tree(tmp_path)
    one_line(cli("cache-teachers", "--tasks", world["tasks"], *[a for t in teachers for a in ("--teacher", t)],
                 "--out", out, "--views", 1_000_000_000, "--force"), "--views", "KACLI_MAX_VIEWS")
    assert tree(tmp_path) == before


def test_resume_refuses_settings_it_cannot_honour(cli, world, runs, tmp_path):
    """The saved optimiser keeps its learning rate: --resume --lr 0.5 is refused, not recorded."""
    out, before = existing(runs, "teacher", tmp_path)
    one_line(cli(*teacher_args(world, out, "--resume", "--epochs", 3, "--lr", 0.5)), "last.pt", "train.lr", "0.5")
    assert tree(out) == before


def test_untrusted_files_are_named_for_what_they_are(cli, world, runs, tmp_path):
    """A legacy pickle that names code, random bytes and a truncated file, as --backbone-weights:
    one line of ours each (no torch warning first), and no code runs."""
    out, before = existing(runs, "student", tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("code ran",))

    legacy = tmp_path / "legacy.pt"
    torch.save({"body.0.weight": torch.zeros(1), "x": Payload()}, legacy, _use_new_zipfile_serialization=False)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for bad, needle in ((legacy, "needs code to unpickle"), (noise, "neither a zip archive nor a pickle"),
                        (_truncated(runs / "teacher" / "best.pt", tmp_path / "cut.pt"), "truncated")):
        err = one_line(cli(*student_args(world, out, "--force", "--backbone-weights", bad)), bad.name, needle)
        assert "Warning" not in err
    assert not marker.exists()
    assert tree(out) == before


def test_a_cache_names_its_teacher_batch_size(cli, world, tmp_path):
    """The teachers' outputs depend (in the last bits) on the batch they ran in: a rerun with
    another --batch-size is not the same cache, so it is neither 'up to date' nor one that a
    student run made from the first can resume on."""
    from kacli.cache import schema

    teachers = [world["root"] / "t-convex.pt", world["root"] / "t-concave.pt"]
    out = tmp_path / "cache.h5"
    shutil.copy(world["cache"], out)
    before = tree(tmp_path)
    one_line(cli("cache-teachers", "--tasks", world["tasks"], *[a for t in teachers for a in ("--teacher", t)],
                 "--out", out, "--batch-size", 2, "--dtype", "float32", "--workers", 0, "--device", "cpu"),
             "cache.h5", "batch_size", "--force")
    assert tree(tmp_path) == before
    with h5py.File(out, "r") as f:
        attrs = schema.validate(f, out, require_complete=True).attrs
    assert schema.content_id(attrs, 100) != schema.content_id({**attrs, "batch_size": 2}, 100)
