"""Nothing already written is touched, part two: outputs that exist, symbolic links, two runs in one
folder, full and read-only disks, ``--out .``, absurd numbers and deep nesting.

Every refusal here goes through the CLI and must exit with code 2, print one line (under 200
characters besides the paths it names) naming the file at fault, with no traceback, and leave the
sha256 of every file that was there and the listing of its folder as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from kacli.engine.rundir import RunLock
from kacli.models.checkpoint import load_checkpoint, save_checkpoint
from test_runs_survive import (  # noqa: F401
    ROOT, _nan_cache, existing, kacli, one_line, runs, student_args, teacher_args, world,
)


def only_line(result, *needles: str) -> str:
    """:func:`one_line`, and nothing else on stderr (not even an empty line before it)."""
    err = one_line(result, *needles)
    assert result.stderr.splitlines() == [err], result.stderr
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file by its sha256, anything else by its kind."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if p.is_dir() else "special"
    return out


def _eval(world, runs, *extra):
    return ["eval", "--model", runs / "teacher", "--tasks", world["tasks"], "--split", "val", *extra]


# -- item 1: an output that exists is refused without --force; one that is not a regular file always ------


@pytest.mark.parametrize("flag", ["--json", "--detections"])
def test_eval_refuses_an_existing_output_without_force(cli, world, runs, tmp_path, flag):
    target = tmp_path / "mine.json"
    target.write_text('{"kept": true}\n')
    before = snapshot(tmp_path)
    one_line(cli(*_eval(world, runs, flag, target)), "mine.json", "--force")
    assert snapshot(tmp_path) == before


def test_eval_json_with_force_replaces_the_file(cli, world, runs, tmp_path):
    target = tmp_path / "mine.json"
    target.write_text("old\n")
    r = cli(*_eval(world, runs, "--json", target, "--force"))
    assert r.exit_code == 0, r.stderr
    assert "AP" in json.loads(target.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
@pytest.mark.parametrize("flag", ["--json", "--detections"])
def test_eval_never_replaces_what_is_not_a_regular_file(cli, world, runs, tmp_path, kind, flag):
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "real.json").write_text("mine\n")
        target = tmp_path / "link.json"
        target.symlink_to(tmp_path / "real.json")
    else:
        target = Path("/dev/full")
        if not target.exists():
            pytest.skip("no /dev/full here")
    before = snapshot(tmp_path)
    err = one_line(cli(*_eval(world, runs, flag, target, "--force")), str(target))
    assert ("symbolic link" if kind == "symlink" else "not a regular file") in err
    assert snapshot(tmp_path) == before
    if kind == "device":
        assert target.is_char_device()


def test_eval_json_into_a_folder_is_one_line(cli, world, runs, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x")
    before = snapshot(tmp_path)
    one_line(cli(*_eval(world, runs, "--json", tmp_path / "dir", "--force")), "dir", "folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["export", "import-checkpoint"])
def test_export_and_import_refuse_an_existing_out_without_force(cli, runs, tmp_path, command):
    target = tmp_path / "model.out"
    target.write_bytes(b"precious")
    before = snapshot(tmp_path)
    args = (["export", "--model", runs / "teacher", "--format", "torchscript", "--out", target] if command == "export"
            else ["import-checkpoint", runs / "teacher" / "best.pt", "--out", target])
    one_line(cli(*args), "model.out", "--force")
    assert snapshot(tmp_path) == before


def test_export_with_force_replaces_the_file(cli, runs, tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    r = cli("export", "--model", runs / "teacher", "--format", "torchscript", "--out", target, "--force")
    assert r.exit_code == 0, r.stderr
    assert target.read_bytes() != b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# -- item 2: symbolic links as --out, and folders kacli did not make -----------------------------------------


def test_a_symlinked_run_folder_is_refused_even_with_force(cli, world, runs, tmp_path):
    out, _ = existing(runs, "teacher", tmp_path)
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    before = snapshot(tmp_path)
    one_line(cli(*teacher_args(world, link, "--force", "--epochs", 1)), "link", "symbolic link")
    assert snapshot(tmp_path) == before


def test_a_symlinked_output_folder_is_refused(cli, world, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mine.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    before = snapshot(tmp_path)
    data = world["root"] / "data"
    one_line(cli("split-tasks", "--train", data / "train.json", "--scheme", data / "tasks-2.yaml",
                 "--out", tmp_path / "link", "--force"), "link", "symbolic link")
    assert snapshot(tmp_path) == before


def test_folders_named_like_kaclis_own_are_never_deleted(cli, world, runs, tmp_path):
    """A user's ``.<run>.old`` and ``.<run>.new`` survive --resume and --force; only folders
    carrying kacli's marker are kacli's."""
    out, _ = existing(runs, "teacher", tmp_path)
    for name in (".teacher.old", ".teacher.new", ".teacher.new-abc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(b"the user's")
    mine = {k: v for k, v in snapshot(tmp_path).items() if k.startswith(".teacher.")}
    r = cli(*teacher_args(world, out, "--resume"))
    assert r.exit_code == 0, r.stderr
    r = cli(*teacher_args(world, out, "--force", "--epochs", 1))
    assert r.exit_code == 0, r.stderr
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(".teacher.")} == mine
    assert (out / "notes.txt").read_text() == "kept by the user\n" and not (out / ".kacli-staging").exists()


# -- item 3: one run at a time in a run folder ---------------------------------------------------------------


def _wait_for(pred, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_is_refused_and_a_killed_runs_lock_is_stale(world, tmp_path):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "kacli", *map(str, teacher_args(world, out, "--epochs", 100000 - 1))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        _wait_for(lambda: lock.is_file() and f"pid {first.pid}" in lock.read_text())
        second = kacli(*teacher_args(world, out, "--epochs", 1))
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and f"pid {first.pid}" in err and "run" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.is_file()  # left by the kill ...
    third = kacli(*teacher_args(world, out, "--epochs", 1, "--force"))  # ... and seen as stale
    assert third.returncode == 0, third.stderr[-2000:]
    assert (out / "last.pt").is_file() and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_amalgamate_into_a_locked_folder_is_one_line(cli, world, runs, tmp_path):
    out, _ = existing(runs, "student", tmp_path)
    held = RunLock(out)
    held.acquire()
    try:
        before = snapshot(tmp_path)
        one_line(cli(*student_args(world, out, "--force")), "student", "another kacli run", f"pid {os.getpid()}")
        assert snapshot(tmp_path) == before
    finally:
        held.release()
    assert not (tmp_path / ".student.lock").exists()


# -- item 4 and 5: checkpoints whose tensors do not fit, or are not finite ------------------------------------


def _altered(runs: Path, tmp_path: Path, change) -> Path:
    ck = load_checkpoint(runs / "teacher" / "best.pt")
    ck.pop("path")
    change(ck["model"])
    return save_checkpoint(tmp_path / "altered.pt", ck)


def _resized(sd):
    sd["class_embed.weight"] = torch.zeros(sd["class_embed.weight"].shape[0] + 2, sd["class_embed.weight"].shape[1])


@pytest.mark.parametrize("command", ["eval", "predict", "export", "cache-teachers"])
def test_a_checkpoint_with_wrong_shapes_is_one_line(cli, world, runs, tmp_path, command):
    bad = _altered(runs, tmp_path, _resized)
    image = next((world["root"] / "data" / "images" / "val").iterdir())
    args = {
        "eval": ["eval", "--model", bad, "--tasks", world["tasks"], "--split", "val"],
        "predict": ["predict", "--model", bad, image, "--out", tmp_path / "pred"],
        "export": ["export", "--model", bad, "--format", "torchscript", "--out", tmp_path / "m.pt"],
        "cache-teachers": ["cache-teachers", "--tasks", world["tasks"], "--teacher", bad, "--teacher", bad,
                           "--out", tmp_path / "c.h5", "--workers", 0],
    }[command]
    before = snapshot(tmp_path)
    one_line(cli(*args), "altered.pt", "wrong shape", "class_embed.weight")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_model_with_nan_weights_says_so(cli, world, tmp_path, runs, command):
    bad = _altered(runs, tmp_path, lambda sd: sd["bbox_embed.layers.2.bias"].fill_(float("nan")))
    args = (["eval", "--model", bad, "--tasks", world["tasks"], "--split", "val"] if command == "eval"
            else ["export", "--model", bad, "--format", "torchscript", "--out", tmp_path / "m.pt"])
    before = snapshot(tmp_path)
    one_line(cli(*args), "altered.pt", "NaN")
    assert snapshot(tmp_path) == before


def test_cache_teachers_refuses_non_finite_outputs_and_keeps_nothing(cli, world, runs, tmp_path):
    """Finite weights that overflow: the outputs are checked as they are written."""
    ck = load_checkpoint(world["root"] / "t-concave.pt")
    ck.pop("path")
    ck["model"]["class_embed.weight"].fill_(3e38)
    bad = save_checkpoint(tmp_path / "altered.pt", ck)
    good = runs / "teacher" / "best.pt"
    before = snapshot(tmp_path)
    err = one_line(cli("cache-teachers", "--tasks", world["tasks"], "--teacher", good, "--teacher", bad,
                       "--out", tmp_path / "c.h5", "--workers", 0), "altered.pt", "entry 0", "nothing was kept")
    assert "teacher" in err
    assert snapshot(tmp_path) == before


# -- item 6: a full disk, a read-only folder ------------------------------------------------------------------


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_eval_json_on_a_full_or_read_only_disk(cli, world, runs, tmp_path, monkeypatch, code, needle):
    (tmp_path / "keep.json").write_text("mine\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "fsync", _raise(code))  # the write of the file's last bytes fails
    one_line(cli(*_eval(world, runs, "--json", tmp_path / "keep.json", "--force")), "keep.json", needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
@pytest.mark.parametrize("command", ["split-tasks", "make-demo-data", "export", "predict"])
def test_outputs_on_a_full_or_read_only_disk(cli, world, runs, tmp_path, monkeypatch, code, needle, command):
    """Creating the temporary output fails as on a read-only file system or a full disk."""
    data = world["root"] / "data"
    out = tmp_path / "out"
    image = next((data / "images" / "val").iterdir())
    args = {
        "split-tasks": ["split-tasks", "--train", data / "train.json", "--scheme", data / "tasks-2.yaml", "--out", out],
        "make-demo-data": ["make-demo-data", "--out", out, "--train-images", 2, "--val-images", 1, "--test-images", 0],
        "export": ["export", "--model", runs / "teacher", "--format", "torchscript", "--out", out],
        "predict": ["predict", "--model", runs / "teacher", image, "--out", out],
    }[command]
    before = snapshot(tmp_path)
    monkeypatch.setattr(tempfile, "mkdtemp", _raise(code))
    monkeypatch.setattr(tempfile, "mkstemp", _raise(code))
    one_line(cli(*args), str(out), needle)
    assert snapshot(tmp_path) == before


def test_a_checkpoint_save_on_a_full_disk_keeps_the_old_run(cli, world, runs, tmp_path, monkeypatch):
    out, _ = existing(runs, "teacher", tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", _raise(errno.ENOSPC))
    err = one_line(cli(*teacher_args(world, out, "--force", "--epochs", 1)), f"{out}/", ".pt", "no space left")
    assert ".new-" not in err  # named as the run's file, not the staging folder's
    assert snapshot(tmp_path) == before


def _limited(max_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.mark.slow
def test_a_real_write_past_a_file_size_limit_is_one_line(world, tmp_path):
    """The system refuses the bytes (RLIMIT_FSIZE: what a full disk looks like to a writer, no root needed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "kacli", *map(str, teacher_args(world, out, "--epochs", 1))],
                       capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=_limited(64 << 10), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "file too large" in err and ".pt" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(cli, world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        data = world["root"] / "data"
        one_line(cli("split-tasks", "--train", data / "train.json", "--scheme", data / "tasks-2.yaml",
                     "--out", ro / "tasks"), "tasks", "permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# -- item 7: --out naming the working folder -----------------------------------------------------------------


@pytest.mark.parametrize("out", [".", "", "sub/.."])
@pytest.mark.parametrize("command", ["split-tasks", "make-demo-data", "merge-tasks", "predict"])
def test_out_naming_the_working_folder_is_one_line(cli, world, runs, tmp_path, monkeypatch, out, command):
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    (here / "mine.txt").write_text("mine")
    monkeypatch.chdir(here)
    data = world["root"] / "data"
    image = next((data / "images" / "val").iterdir())
    args = {
        "split-tasks": ["split-tasks", "--train", data / "train.json", "--scheme", data / "tasks-2.yaml"],
        "make-demo-data": ["make-demo-data", "--train-images", 2, "--val-images", 1],
        "merge-tasks": ["merge-tasks", "--task", f"shapes={data / 'train.json'}", "--images",
                        f"shapes={data / 'images' / 'train'}"],
        "predict": ["predict", "--model", runs / "teacher", image],
    }[command]
    before = snapshot(tmp_path)
    one_line(cli(*args, "--out", out, "--force"), "working folder")
    assert snapshot(tmp_path) == before


# -- item 8 and 9: numbers that are not numbers, or could never finish; deep nesting ----------------------


@pytest.mark.parametrize("args, needles", [
    (["demo", "--minutes", "nan"], ["--minutes", "finite"]),
    (["demo", "--minutes", "inf"], ["--minutes", "finite"]),
    (["ablate", "--minutes", "inf"], ["--minutes", "finite"]),
    (["demo", "--minutes", "1e9"], ["KACLI_MAX_MINUTES"]),
    (["ablate", "--minutes", "1e9"], ["KACLI_MAX_MINUTES"]),
    (["ablate", "--seeds", "99999999999"], ["KACLI_MAX_SEEDS"]),
    (["demo", "--seed", "99999999999999999999"], ["--seed"]),
])
def test_absurd_demo_numbers_are_one_line(cli, tmp_path, args, needles):
    out = tmp_path / "o"
    one_line(cli(*args, "--out", out), *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "99999999999999999999", "seed"),
    ("--seed", "-1", "seed"),
    ("--workers", "100000", "KACLI_MAX_WORKERS"),
    ("--epochs", "99999999999", "KACLI_MAX_EPOCHS"),
])
def test_absurd_training_numbers_are_one_line(cli, world, runs, tmp_path, flag, value, needle):
    out, _ = existing(runs, "teacher", tmp_path)
    before = snapshot(tmp_path)
    one_line(cli(*teacher_args(world, out, "--force", flag, value)), needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag, value, needle", [("--seed", "99999999999999999999", "--seed"),
                                                 ("--workers", "100000", "KACLI_MAX_WORKERS")])
def test_absurd_cache_numbers_leave_no_partial(cli, world, runs, tmp_path, flag, value, needle):
    t = runs / "teacher"
    one_line(cli("cache-teachers", "--tasks", world["tasks"], "--teacher", t, "--teacher", t,
                 "--out", tmp_path / "c.h5", flag, value), needle)
    assert list(tmp_path.iterdir()) == []


def test_a_limit_is_raised_by_its_environment_variable(monkeypatch):
    from kacli import limits
    from kacli.errors import KacliError

    with pytest.raises(KacliError, match="KACLI_MAX_EPOCHS"):
        limits.check_limit("--epochs", 200_000, "KACLI_MAX_EPOCHS")
    monkeypatch.setenv("KACLI_MAX_EPOCHS", "300000")
    limits.check_limit("--epochs", 200_000, "KACLI_MAX_EPOCHS")


DEPTH = 100_000


@pytest.mark.parametrize("kind", ["split-json", "config-yaml", "report-metrics", "safetensors"])
def test_deep_nesting_is_one_line(cli, world, runs, tmp_path, kind):
    deep_json = "[" * DEPTH + "]" * DEPTH
    data = world["root"] / "data"
    if kind == "split-json":
        bad = tmp_path / "deep.json"
        bad.write_text(deep_json)
        args = ["split-tasks", "--train", bad, "--scheme", data / "tasks-2.yaml", "--out", tmp_path / "t"]
    elif kind == "config-yaml":
        bad = tmp_path / "deep.yaml"
        bad.write_text("a: " + deep_json + "\n")
        args = teacher_args(world, tmp_path / "r", "--config", bad)
    elif kind == "report-metrics":
        bad = tmp_path / "run"
        shutil.copytree(runs / "teacher", bad)
        with open(bad / "metrics.jsonl", "a") as f:
            f.write(deep_json + "\n")
        bad = bad / "metrics.jsonl"
        args = ["report", bad.parent]
    else:
        bad = tmp_path / "deep.safetensors"
        header = ('{"a":' * 20000 + "1" + "}" * 20000).encode()
        bad.write_bytes(len(header).to_bytes(8, "little") + header)
        args = ["import-checkpoint", bad, "--out", tmp_path / "x.pt"]
    before = snapshot(tmp_path)
    one_line(cli(*args), bad.name)
    assert snapshot(tmp_path) == before


# -- smaller: a path that would move the cursor or colour the terminal is shown escaped ----------------------


def test_control_characters_in_a_path_are_escaped(cli, world, tmp_path):
    weird = tmp_path / "a\nb\x1b[31mred"
    err = one_line(cli("split-tasks", "--train", weird, "--scheme", world["root"] / "data" / "tasks-2.yaml",
                       "--out", tmp_path / "t"), "\\n", "\\x1b")
    assert "\x1b" not in err


# -- smaller: a training error is the one line, with no empty line before it --------------------------------


def test_an_error_during_training_is_the_only_line_on_stderr(cli, world, tmp_path):
    """The progress display of a failed run leaves nothing behind (not even the empty line rich
    ends a display with when stderr is a file)."""
    bad = _nan_cache(world["cache"], tmp_path / "nan.h5")
    r = cli("amalgamate", "--cache", bad, "--epochs", 1, "--out", tmp_path / "s")
    only_line(r, "nan.h5", "entry 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5"]


# -- smaller: usage errors (a value of the wrong type, an unknown option) are one line too --------------------


@pytest.mark.parametrize("args, needles", [
    (["ablate", "--seeds", "abc"], ["kacli ablate", "--seeds", "integer"]),
    (["train-teacher", "--epochs", "1.5"], ["kacli train-teacher", "--epochs"]),
    (["eval", "--bogus"], ["kacli eval", "--bogus"]),
    (["predict", "--model", "m.pt"], ["kacli predict", "IMAGE"]),
    (["cache-teachers", "--out", "c.h5"], ["kacli cache-teachers", "--tasks"]),
    (["no-such-command"], ["kacli", "no-such-command"]),
    (["--bogus"], ["kacli", "--bogus"]),
])
def test_usage_errors_are_one_line(cli, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    err = only_line(r, *needles)
    assert "--help" in err and "╭" not in r.stderr + r.stdout
    assert list(tmp_path.iterdir()) == []


def test_kacli_alone_still_shows_its_help(cli):
    r = cli()
    assert "Usage" in r.stdout and "train-teacher" in r.stdout


# -- smaller: a resume that trains nothing does not rewrite the run's config ------------------------------------


@pytest.mark.parametrize("kind, extra, key", [
    ("teacher", ["--batch-size", 8], "train.batch_size"),
    ("student", ["--batch-size", 8], "train.batch_size"),
    ("teacher", ["--epochs", 1], "train.epochs"),
])
def test_resuming_a_finished_run_with_other_settings_is_refused(cli, world, runs, tmp_path, kind, extra, key):
    """Nothing would be trained with the new value, so config.yaml must not claim it (as --resume
    refuses a new learning rate the saved optimiser would not use)."""
    out, _ = existing(runs, kind, tmp_path)
    before = snapshot(tmp_path)
    args = teacher_args(world, out, "--resume", *extra) if kind == "teacher" else student_args(world, out, "--resume", *extra)
    only_line(cli(*args), "last.pt", "nothing to train", key, "--epochs")
    assert snapshot(tmp_path) == before


def test_resuming_a_finished_run_as_it_was_still_succeeds(cli, world, runs, tmp_path):
    out, _ = existing(runs, "student", tmp_path)
    config = (out / "config.yaml").read_bytes()
    r = cli(*student_args(world, out, "--resume"))
    assert r.exit_code == 0, r.stderr
    assert (out / "config.yaml").read_bytes() == config


# -- smaller: predict --format coco never gives two images one id ---------------------------------------------


def _two_images_named_alike(world, tmp_path: Path) -> None:
    image = next((world["root"] / "data" / "images" / "val").iterdir())
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "000001.png")


def test_predict_coco_refuses_two_images_with_one_id(cli, world, runs, tmp_path, monkeypatch):
    """An image id is the image's id in its dataset, so a results file cannot make one up: two
    files both named 000001.png are refused, and --image-ids names each one."""
    _two_images_named_alike(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    model = runs / "teacher"
    before = snapshot(tmp_path)
    err = only_line(cli("predict", "--model", model, "a/000001.png", "b/000001.png", "--format", "coco", "--out", "p"),
                   "b/000001.png", "a/000001.png", "image id 1", "--image-ids")
    assert snapshot(tmp_path) == before
    # an --image-ids file that names them only by their common file name cannot tell them apart either
    (tmp_path / "ids.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "000001.png"}]}))
    before = snapshot(tmp_path)
    only_line(cli("predict", "--model", model, "a/000001.png", "b/000001.png", "--format", "coco", "--out", "p",
                 "--image-ids", "ids.json"), "b/000001.png", "image id 7", "--image-ids")
    assert snapshot(tmp_path) == before
    # ... one that names each file does
    (tmp_path / "ids.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "a/000001.png"},
                                                              {"id": 8, "file_name": "b/000001.png"}]}))
    r = cli("predict", "--model", model, "a/000001.png", "b/000001.png", "--format", "coco", "--out", "p",
            "--image-ids", "ids.json", "--threshold", 0)
    assert r.exit_code == 0, r.stderr
    assert {d["image_id"] for d in json.loads((tmp_path / "p" / "predictions.json").read_text())} == {7, 8}


# -- smaller: cached values no teacher writes are named, not blamed on the learning rate ----------------------


@pytest.fixture(scope="module")
def int8_cache(world):
    from kacli.cache.writer import cache_teachers

    path = world["root"] / "cache-int8.h5"
    if not path.exists():
        cache_teachers(world["tasks"], [world["root"] / "t-convex.pt", world["root"] / "t-concave.pt"], path, views=1,
                       dtype="int8", batch_size=4, workers=0, device="cpu", log=lambda *a, **k: None, progress=False)
    return path


def _edited(src: Path, dst: Path, name: str, index, value) -> Path:
    import h5py

    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        f[name][index] = value
    return dst


@pytest.mark.parametrize("value, needle", [(-0.5, "negative scales"), (0.0, "zero scales"), (6e4, "scales above")])
def test_verify_flags_int8_scales_no_writer_stores(cli, int8_cache, tmp_path, value, needle):
    bad = _edited(int8_cache, tmp_path / "bad.h5", "teachers/1/scale", (3, 1), value)
    before = snapshot(tmp_path)
    only_line(cli("cache-info", bad, "--verify"), "bad.h5", "verification failed", "teacher 1 (concave)",
             "layer enc1", needle)
    assert snapshot(tmp_path) == before
    r = cli("cache-info", int8_cache, "--verify")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("what, index, needle", [("boxes", (3, 0, 2), "outside [0, 1]"),
                                                  ("boxes", (3, 1, 0), "outside [0, 1]"),
                                                  ("logits", (3, 0, 0), "beyond ±65504")])
def test_cached_outputs_out_of_range_are_named_with_the_cache_and_entry(cli, world, tmp_path, what, index, needle):
    """Boxes of 1e30 (or below 0), logits of 1e30: finite, yet what no teacher writes. Training
    names the cache and the entry instead of a learning rate; --verify names the teacher."""
    value = -0.25 if index == (3, 1, 0) else 1e30
    bad = _edited(world["cache"], tmp_path / "bad.h5", f"teachers/1/{what}", index, value)
    before = snapshot(tmp_path)
    err = only_line(cli("amalgamate", "--cache", bad, "--epochs", 1, "--out", tmp_path / "s"),
                   "bad.h5", "entry 3", f"teacher 1's cached {what}", needle)
    assert "learning rate" not in err
    only_line(cli("cache-info", bad, "--verify"), "bad.h5", "teacher 1 (concave)", f"/teachers/1/{what}", needle)
    assert snapshot(tmp_path) == before
