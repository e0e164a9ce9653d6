"""train-teacher end to end on generated data: it learns, it resumes, it refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kacli.data.demo_data import make_demo_data
from kacli.data.split import split_tasks
from kacli.models.checkpoint import load_checkpoint
from conftest import assert_one_line_error

# A small DETR that memorises 8 images quickly: no augmentation, 2+2 layers, 8 queries.
OVERFIT = {
    "model": {"backbone": "tiny", "d_model": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2,
              "dim_feedforward": 128, "dropout": 0.0, "num_queries": 8, "pre_norm": True},
    "aug": {"scales": [128], "max_size": 128, "crop_p": 0.0, "flip_p": 0.0, "eval_size": 128},
    "train": {"epochs": 150, "batch_size": 8, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000,
              "workers": 0, "eval_every": 50},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """8 demo images used as both train and val, split into the demo's two tasks."""
    root = tmp_path_factory.mktemp("teacher")
    make_demo_data(root / "data", train_images=8, val_images=4, seed=3, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "train.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks")
    cfg = root / "overfit.yaml"
    cfg.write_text(yaml.safe_dump(OVERFIT))
    return root


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_detr_overfits_8_images(cli, demo, tmp_path):
    run = tmp_path / "convex"
    r = cli("train-teacher", "--tasks", demo / "tasks" / "tasks.yaml", "--task", "convex",
            "--config", demo / "overfit.yaml", "--out", run)
    assert r.exit_code == 0, r.stderr
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == list(range(1, 151))
    evals = [row for row in rows if "AP50" in row]
    assert evals[-1]["AP50"] >= 0.9, evals
    assert evals[-1]["AP50"] > evals[0]["AP50"]
    assert rows[-1]["total"] < 0.5 * rows[0]["total"]
    # The checkpoint is plain data (weights_only) and knows its task and label map.
    ck = load_checkpoint(run / "best.pt")
    manifest = yaml.safe_load((demo / "tasks" / "tasks.yaml").read_text())
    convex = next(t for t in manifest["tasks"] if t["name"] == "convex")
    assert ck["task"] == "convex" and ck["label_map"]["ids"] == convex["category_ids"]
    assert ck["meta"]["metrics"]["AP50"] == max(e["AP50"] for e in evals)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["model"]["num_queries"] == 8
    # kacli eval on the checkpoint reproduces the training-time validation AP.
    out = tmp_path / "eval.json"
    r = cli("eval", "--model", run, "--tasks", demo / "tasks" / "tasks.yaml", "--json", out)
    assert r.exit_code == 0, r.stderr
    ev = json.loads(out.read_text())
    assert ev["AP50"] == pytest.approx(ck["meta"]["metrics"]["AP50"])
    assert ev["per_task"]["convex"]["AP"] == pytest.approx(ev["AP"])
    assert ev["params"] > 0 and ev["gflops"] > 0


def _short(demo: Path, epochs: int) -> list[str]:
    return ["--tasks", str(demo / "tasks" / "tasks.yaml"), "--task", "concave", "--config", str(demo / "overfit.yaml"),
            "--epochs", str(epochs)]


def test_resume_continues_the_same_run(cli, demo, tmp_path):
    """2 epochs + --resume to 4 equals 4 epochs straight, weight for weight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli("train-teacher", *_short(demo, 4), "--out", straight).exit_code == 0
    assert cli("train-teacher", *_short(demo, 2), "--out", resumed).exit_code == 0
    r = cli("train-teacher", *_short(demo, 4), "--out", resumed, "--resume")
    assert r.exit_code == 0, r.stderr
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [row["epoch"] for row in _metrics(resumed)] == [1, 2, 3, 4]
    assert [row["total"] for row in _metrics(resumed)] == pytest.approx([row["total"] for row in _metrics(straight)])


def test_bad_inputs(cli, demo, tmp_path):
    tasks = demo / "tasks" / "tasks.yaml"
    cfg = demo / "overfit.yaml"
    # a task that is not in tasks.yaml
    r = cli("train-teacher", "--tasks", tasks, "--task", "nope", "--config", cfg, "--out", tmp_path / "a")
    assert_one_line_error(r, "tasks.yaml", "nope")
    assert not (tmp_path / "a").exists()
    # an unknown config key
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    r = cli("train-teacher", "--tasks", tasks, "--task", "convex", "--config", bad, "--out", tmp_path / "b")
    assert_one_line_error(r, "bad.yaml", "train.lrr")
    # --resume from another run's checkpoint (another task), and nothing overwritten
    run = tmp_path / "run"
    assert cli("train-teacher", *_short(demo, 1), "--out", run).exit_code == 0
    before = (run / "last.pt").read_bytes()
    r = cli("train-teacher", "--tasks", tasks, "--task", "convex", "--config", cfg, "--epochs", 2,
            "--out", run, "--resume")
    assert_one_line_error(r, "last.pt", "another run")
    assert (run / "last.pt").read_bytes() == before
    # a non-empty run folder without --resume or --force
    r = cli("train-teacher", *_short(demo, 1), "--out", run)
    assert_one_line_error(r, "not empty")
    assert (run / "last.pt").read_bytes() == before
    # a file that is no checkpoint, given to eval
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = cli("eval", "--model", junk, "--tasks", tasks)
    assert_one_line_error(r, "junk.pt")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["detr", "conditional"])
def test_data_parallel_training_under_torchrun(demo, tmp_path, arch):
    """Two gloo processes on the CPU: each rank takes half of every epoch, rank 0 writes the run
    (DETR and Conditional DETR alike)."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    run = tmp_path / "ddp"
    config = tmp_path / "overfit.yaml"
    config.write_text(yaml.safe_dump({**OVERFIT, "model": {**OVERFIT["model"], "arch": arch}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(29537 + (arch == "conditional")), "-m", "kacli",
         "train-teacher", "--tasks", str(demo / "tasks" / "tasks.yaml"), "--task", "convex", "--config", str(config),
         "--epochs", "3", "--batch-size", "2", "--out", str(run)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(row["steps"] == 2 for row in rows)  # 8 images / (2 ranks x batch 2)
    assert rows[-1]["total"] < rows[0]["total"]
    ck = load_checkpoint(run / "last.pt")
    assert not any(k.startswith("module.") for k in ck["model"])
    assert ck["arch"].get("arch", "detr") == arch
    assert r.stdout.count("teacher convex:") == 1
