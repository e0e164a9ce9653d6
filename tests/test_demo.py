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
    r = cli("demo", "--out", out, "--train-images", 48, "--val-images", 12, "--minutes", 0.5)
    assert r.exit_code == 0, r.stderr
    rows = json.loads((out / "report.json").read_text())
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
    assert len(pictures) >= 3
    summary = json.loads((out / "demo.json").read_text())
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


def test_demo_force_keeps_the_old_demo_when_the_new_one_fails(cli, tmp_path, monkeypatch):
    """--force moves the old demo aside and puts it back when the new one fails."""
    import kacli.data.demo_data

    out = tmp_path / "demo"
    (out / "runs").mkdir(parents=True)
    (out / "report.md").write_text("the old report\n")
    (out / "runs" / "last.pt").write_bytes(b"old weights")

    def fail(path, **kw):
        raise kacli.errors.KacliError("disk full", path)

    monkeypatch.setattr(kacli.data.demo_data, "make_demo_data", fail)
    assert_one_line_error(cli("demo", "--out", out, "--force"), "disk full")
    assert (out / "report.md").read_text() == "the old report\n"
    assert (out / "runs" / "last.pt").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
