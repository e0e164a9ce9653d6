"""README's "Teachers from other tools": every command of its table runs as written (at toy size), on
a folder that examples/transformers-teacher/train_rtdetr.py trains with transformers' own loss."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPT = ROOT / "examples" / "transformers-teacher" / "train_rtdetr.py"
TOY = {"amalgamate": ["--epochs", "1"]}


def section_commands() -> list[list[str]]:
    """`kacli ...` commands of the section's table, in order."""
    text = README.read_text().split("## Teachers from other tools", 1)[1].split("\n## ", 1)[0]
    table = text.split("| case | command |", 1)[1].split("\n\n", 1)[0]
    return [shlex.split(cell)[1:] for cell in re.findall(r"`(kacli [^`]+)`", table)]


def train_rtdetr(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("train_rtdetr", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_the_section_names_the_script_and_its_output():
    text = README.read_text().split("## Teachers from other tools", 1)[1].split("\n## ", 1)[0]
    assert "examples/transformers-teacher/train_rtdetr.py --tasks tasks/tasks.yaml --task convex --out rtdetr" in " ".join(
        text.split())
    cmds = section_commands()
    assert [c[0] for c in cmds] == ["cache-teachers", "amalgamate", "amalgamate", "eval", "predict", "merge-tasks"]
    assert [any("rtdetr/best" in a for a in c) for c in cmds] == [True, False, True, True, True, True]


@pytest.mark.slow
def test_section_commands_run_on_a_trained_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for c in (["make-demo-data", "--out", "data", "--train-images", "24", "--val-images", "6", "--test-images", "6"],
              ["split-tasks", "--train", "data/train.json", "--val", "data/val.json", "--test", "data/test.json",
               "--scheme", "data/tasks-2.yaml", "--out", "tasks"],
              ["train-teacher", "--tasks", "tasks/tasks.yaml", "--task", "concave", "--config", "tiny", "--out",
               "runs/concave", "--epochs", "1"]):
        r = cli(*c)
        assert r.exit_code == 0, (c, r.stderr[-1500:])
    # the kacli teacher's width and stride (tiny: 64, 16), so that its AIFI level guides the student too
    assert train_rtdetr(["--tasks", "tasks/tasks.yaml", "--task", "convex", "--out", "rtdetr", "--epochs", "2",
                         "--tiny", "--width", "64", "--stride", "16"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rtdetr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert {p.name for p in (tmp_path / "rtdetr" / "best").iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json"}
    monkeypatch.setenv("COLUMNS", "250")
    for c in section_commands():
        r = cli(*c, *TOY.get(c[0], []))
        assert r.exit_code == 0, (c, r.stdout[-1500:], r.stderr[-1500:])
        if c[0] == "cache-teachers":  # its summary says what the folder teaches
            assert "convex (RT-DETR, transformers folder: SA (enc3) + TA)" in r.stdout, r.stdout
    assert (tmp_path / "runs" / "student-rtdetr" / "best.pt").is_file()
    from kacli.cache.schema import read_layout

    rt = read_layout(tmp_path / "cache-rtdetr.h5").teachers[0]
    assert (rt["kind"], rt["sequences"], rt["layers"]) == ("transformers", True, ["enc3"])
    assert (tmp_path / "pred-rtdetr" / "predictions.json").is_file()
    assert (tmp_path / "merged" / "tasks.yaml").is_file()
