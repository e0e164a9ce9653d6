"""Conditional DETR through the CLI: a teacher trains and is cached beside a DETR teacher, a student
of either architecture trains from the mixed cache, and their checkpoints evaluate and predict;
mixing architectures where they cannot mix is one line."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import assert_one_line_error
from kacli.cache.reader import TeacherCache
from kacli.data.demo_data import make_demo_data
from kacli.data.split import split_tasks
from kacli.models.checkpoint import load_checkpoint

SMALL = {"backbone": "tiny", "tiny_widths": [8, 8, 16, 16], "d_model": 32, "nheads": 4, "enc_layers": 2,
         "dec_layers": 2, "dim_feedforward": 64, "dropout": 0.0, "num_queries": 6, "pre_norm": True}


def _config(path, arch):
    path.write_text(yaml.safe_dump({
        "model": {**SMALL, "arch": arch},
        "aug": {"scales": [64], "max_size": 64, "crop_p": 0.0, "flip_p": 0.5, "eval_size": 64},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000, "workers": 0,
                  "eval_every": 1, "seed": 0},
    }))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    make_demo_data(root / "data", train_images=12, val_images=4, test_images=4, seed=2, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "val.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks", test_spec=str(root / "data" / "test.json"))
    return {"root": root, "tasks": root / "tasks" / "tasks.yaml", "detr": _config(root / "detr.yaml", "detr"),
            "cond": _config(root / "cond.yaml", "conditional")}


def test_conditional_teacher_beside_a_detr_teacher_to_either_student(cli, env, tmp_path):
    root, tasks = env["root"], env["tasks"]
    runs = {}
    for task, cfg in (("convex", env["detr"]), ("concave", env["cond"])):
        runs[task] = tmp_path / f"t-{task}"
        res = cli("train-teacher", "--tasks", tasks, "--task", task, "--config", cfg, "--out", runs[task])
        assert res.exit_code == 0, res.stderr
    ck = load_checkpoint(runs["concave"] / "best.pt")
    assert ck["arch"]["arch"] == "conditional" and ck["model"]["class_embed.weight"].shape[0] == 4  # no "no object"
    rows = [json.loads(line) for line in (runs["concave"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["total"] < rows[0]["total"] and "AP" in rows[-1]

    cache = tmp_path / "cache.h5"
    res = cli("cache-teachers", "--tasks", tasks, "--teacher", runs["convex"], "--teacher", runs["concave"],
              "--out", cache)
    assert res.exit_code == 0, res.stderr
    assert [t["classifier"] for t in TeacherCache(cache).attrs["teachers"]] == ["softmax", "sigmoid"]
    info = cli("cache-info", cache, "--json")
    assert [t["arch"] for t in json.loads(info.stdout)["teachers"]] == ["detr", "conditional"]

    # the student follows the first teacher's settings (DETR) unless the config says otherwise
    for name, extra in (("detr", []), ("cond", ["--config", env["cond"]])):
        run = tmp_path / f"s-{name}"
        res = cli("amalgamate", "--cache", cache, "--epochs", "2", "--out", run, *extra)
        assert res.exit_code == 0, res.stderr
        ck = load_checkpoint(run / "best.pt")
        assert ck["arch"].get("arch", "detr") == ("conditional" if name == "cond" else "detr")
        out = tmp_path / f"eval-{name}.json"
        res = cli("eval", "--model", run, "--tasks", tasks, "--json", out)
        assert res.exit_code == 0, res.stderr
        assert json.loads(out.read_text())["split"] == "test"
    image = next((root / "data" / "images" / "test").iterdir())
    res = cli("predict", "--model", tmp_path / "s-cond", image, "--threshold", "0", "--out", tmp_path / "preds")
    assert res.exit_code == 0, res.stderr
    preds = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    # a sigmoid model reports its top min(100, Q·K) (query, class) pairs: 6 queries × 8 classes
    assert [len(v) for v in preds.values()] == [48]

    # a sigmoid student has no softmax to soften: a TA temperature is refused before anything is written
    hot = tmp_path / "hot.yaml"
    hot.write_text(yaml.safe_dump({**yaml.safe_load(env["cond"].read_text()), "ta": {"temperature": 2.0}}))
    res = cli("amalgamate", "--cache", cache, "--config", hot, "--out", tmp_path / "s-hot")
    assert_one_line_error(res, "ta.temperature 2.0", "sigmoid classifier")
    assert not (tmp_path / "s-hot").exists()

    # resuming a run as the other architecture names the field that differs
    res = cli("train-teacher", "--tasks", tasks, "--task", "concave", "--config", env["detr"], "--epochs", "3",
              "--resume", "--out", runs["concave"])
    assert_one_line_error(res, "belongs to another run", "arch.arch: 'conditional' there, None here")


def test_demo_and_ablate_refuse_an_unknown_arch(cli, tmp_path):
    assert_one_line_error(cli("demo", "--arch", "deformable", "--out", tmp_path / "d"), "--arch 'deformable'")
    assert not (tmp_path / "d").exists()
    assert_one_line_error(cli("ablate", "--arch", "yolo", "--out", tmp_path / "a"), "--arch 'yolo'")
