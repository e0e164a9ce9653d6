"""Report rows from hand-written run folders and eval JSON files; table, curves, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.text import Text

from conftest import assert_one_line_error
from kacli.errors import KacliError
from kacli.report import load_all, load_inputs, load_rows, plot_curves, rows_markdown, rows_table, write_report


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def inputs(tmp_path):
    """A raw run (metrics.jsonl only), a student run (metrics.jsonl + eval.json), a teacher eval JSON."""
    raw = tmp_path / "runs" / "raw"
    write_jsonl(
        raw / "metrics.jsonl",
        [
            {"epoch": 0, "loss": 3.2, "train_seconds": 10.0},
            {"epoch": 1, "loss": 2.1, "AP": 0.10, "AP50": 0.20, "train_seconds": 20.0},
            {"epoch": 2, "loss": 1.7, "AP": 0.20, "AP50": 0.35, "AP75": 0.15, "train_seconds": 30.5},
        ],
    )
    student = tmp_path / "runs" / "student"
    write_jsonl(
        student / "metrics.jsonl",
        [
            {"epoch": 1, "AP": 0.12, "AP50": 0.25, "train_seconds": 21.0},
            {"epoch": 2, "AP": 0.24, "AP50": 0.41, "train_seconds": 3725.0},
        ],
    )
    (student / "eval.json").write_text(
        json.dumps(
            {
                "model": "student",
                "split": "test",
                "checkpoint": "/runs/student/best.pt",
                "AP": 0.2534,
                "AP50": 0.4321,
                "AP75": 0.2,
                "APs": None,
                "APm": 0.25,
                "APl": None,
                "per_category": {"1": {"name": "circle", "AP": 0.3, "AP50": 0.5}},
                "per_task": {"t1": {"AP": 0.3, "AP50": 0.5, "AP75": 0.25}, "t2": {"AP": 0.2068, "AP50": 0.36, "AP75": 0.15}},
                "params": 660_000,
                "gflops": {"gflops_mac": 0.0523, "gflops": 0.1046, "convention": "multiply-adds"},
                "images": 300,
            }
        )
    )
    teacher = tmp_path / "teacher-t1.json"
    teacher.write_text(
        json.dumps(
            {
                "model": "teacher-t1",
                "split": "test",
                "checkpoint": "/runs/teacher-t1/last.pt",
                "AP": 0.4615,
                "AP50": 0.7419,
                "AP75": 0.478,
                "per_task": {"t1": {"AP": 0.4615, "AP50": 0.7419, "AP75": 0.478}},
                "params": 41_300_000,
                "gflops": 12.7,
                "images": 300,
            }
        )
    )
    return raw, student, teacher


def test_rows_from_run_dirs_and_eval_json(inputs):
    raw, student, teacher = inputs
    rows, curves = load_inputs([teacher, raw, student])
    assert [r["model"] for r in rows] == ["teacher-t1", "raw", "student"]
    t, r, s = rows
    assert (t["AP"], t["params"], t["gflops"], t["train_seconds"]) == (0.4615, 41_300_000, 12.7, None)
    # Each row says which images and which checkpoint its AP is: an eval JSON's split and file,
    # a run's last validation line (the checkpoint of that epoch, on val).
    assert [(x["split"], x["checkpoint"]) for x in rows] == [("test", "last.pt"), ("val", "epoch 2"), ("test", "best.pt")]
    # raw: no eval.json, so the last evaluation line; train time from the last line that has it.
    assert (r["AP"], r["AP50"], r["AP75"], r["train_seconds"]) == (0.20, 0.35, 0.15, 30.5)
    assert r["params"] is None and r["per_task"] == {}
    # student: eval.json's numbers, metrics.jsonl's train time, the MAC convention for gflops.
    assert (s["AP"], s["params"], s["gflops"], s["train_seconds"]) == (0.2534, 660_000, 0.0523, 3725.0)
    assert s["per_task"]["t2"] == {"AP": 0.2068, "AP50": 0.36, "AP75": 0.15}
    assert curves == {"raw": [(1.0, 0.10), (2.0, 0.20)], "student": [(1.0, 0.12), (2.0, 0.24)]}
    assert load_rows([raw]) == [r]


def test_markdown_table_contents(inputs):
    raw, student, teacher = inputs
    md = rows_markdown(load_rows([teacher, raw, student]))
    lines = md.splitlines()
    assert lines[0] == "## TABLE I: knowledge amalgamation results"
    assert lines[2] == "| Model | split | checkpoint | AP | AP50 | AP75 | AP t1 | AP t2 | #param. | FLOPs | train |"
    assert "| teacher-t1 | test | last.pt | 46.15 | 74.19 | 47.80 | 46.15 | – | 41.3M | 12.7G | – |" in lines
    assert "| raw | val | epoch 2 | 20.00 | 35.00 | 15.00 | – | – | – | – | 0:00:30 |" in lines
    # The student shows its gain over raw in AP points, as the paper's Table I does.
    assert ("| student | test | best.pt | 25.34 (+5.34) | 43.21 (+8.21) | 20.00 (+5.00) | 30.00 | 20.68 | 0.66M "
            "| 0.0523G | 1:02:05 |") in lines


def test_rich_table_has_one_column_per_task(inputs):
    raw, student, teacher = inputs
    table = rows_table(load_rows([teacher, raw, student]))
    headers = [c.header for c in table.columns]
    assert headers == ["Model", "split", "ckpt", "AP", "AP50", "AP75", "AP t1", "AP t2", "#param.", "FLOPs", "train"]
    assert list(table.columns[1].cells) == ["test", "val", "test"]
    assert [Text.from_markup(c).plain for c in table.columns[3].cells] == ["46.15", "20.00", "25.34\n(+5.34)"]
    assert list(table.columns[9].cells) == ["12.7G", "–", "0.0523G"]


def test_write_report_files(inputs, tmp_path):
    raw, student, teacher = inputs
    rows, curves = load_inputs([teacher, raw, student])
    out = tmp_path / "out"
    files = write_report(rows, curves, out)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.json", "report.md"]
    assert json.loads(files["report.json"].read_text()) == [json.loads(json.dumps(r)) for r in rows]
    assert files["report.md"].read_text() == rows_markdown(rows)
    png = np.asarray(Image.open(files["curves.png"]).convert("RGB")).astype(int)
    assert png.shape == (480, 720, 3)
    # One line per run in matplotlib's first two cycle colours (#1f77b4, #ff7f0e).
    for colour in [(31, 119, 180), (255, 127, 14)]:
        assert (np.abs(png - colour).sum(-1) < 10).sum() > 100, colour


def test_plot_curves_without_runs_still_writes_a_png(tmp_path):
    p = plot_curves({}, tmp_path / "c.png")
    assert Image.open(p).size == (720, 480)


def test_cli_prints_table_and_writes_files(cli, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    raw, student, teacher = inputs
    out = tmp_path / "report"
    result = cli("report", teacher, raw, student, "--out", out)
    assert result.exit_code == 0, result.output
    for text in ("TABLE I", "teacher-t1", "46.15", "25.34", "(+5.34)", "41.3M", "1:02:05"):
        assert text in result.stdout, text
    assert (out / "report.json").is_file() and (out / "report.md").is_file() and (out / "curves.png").is_file()
    assert (out / "training.png").is_file()  # the raw run's loss curve
    assert "Example: kacli report" in cli("report", "--help").stdout


def test_bad_inputs_give_one_line_errors(cli, inputs, tmp_path):
    raw, _, _ = inputs
    out = tmp_path / "never"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert_one_line_error(cli("report", notes, "--out", out), str(notes), "neither an eval JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("report", empty, "--out", out), str(empty), "not a run directory")
    assert_one_line_error(cli("report", tmp_path / "missing.json"), "missing.json", "not found")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"AP": 0.5,')
    assert_one_line_error(cli("report", bad_json), str(bad_json), "malformed JSON", "line 1")
    other_json = tmp_path / "other.json"
    other_json.write_text('{"images": []}')
    assert_one_line_error(cli("report", other_json), str(other_json), "not an eval JSON")
    # A malformed metrics.jsonl line is named with the file and the line.
    metrics = raw / "metrics.jsonl"
    metrics.write_text('{"epoch": 0, "AP": 0.1}\n{"epoch": 1, "AP": \n')
    assert_one_line_error(cli("report", raw, "--out", out), str(metrics), "line 2")
    metrics.write_text('{"epoch": 0, "AP": "high"}\n')
    assert_one_line_error(cli("report", raw), str(metrics), "line 1", "AP")
    metrics.write_text('{"AP": 0.1}\n')
    assert_one_line_error(cli("report", raw), str(metrics), "line 1", "epoch")
    assert not out.exists()


def test_run_dir_without_a_finished_epoch_is_an_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "lo')  # the first line, being written
    with pytest.raises(KacliError, match="no epoch finished yet"):
        load_rows([run])


def test_a_run_still_training_is_reported_with_its_curves(cli, tmp_path):
    """Validated every 2nd epoch, its 4th line half written: the row has the last validation, the
    training curves every finished epoch's losses and learning rate."""
    run = tmp_path / "runs" / "student"
    lines = [{"epoch": e, "lr": 1e-4 if e < 3 else 1e-5, "steps": 10, "loss_seq": 2.0 / e, "loss_task": 1.0 / e,
              "total": 3.0 / e, "train_seconds": 10.0 * e} for e in (1, 2, 3)]  # fmt: skip
    lines[1].update(AP=0.125, AP50=0.25)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "lr": 1e-5, "loss_s')
    rows, curves, training = load_all([run])
    assert rows[0]["AP"] == 0.125 and rows[0]["train_seconds"] == 30.0
    assert curves == {"student": [(2.0, 0.125)]}
    assert training["student"]["total"] == [(1.0, 3.0), (2.0, 1.5), (3.0, 1.0)]
    assert set(training["student"]) == {"lr", "loss_seq", "loss_task", "total"}
    assert training["student"]["lr"][-1] == (3.0, 1e-5)

    lines[1].pop("AP"), lines[1].pop("AP50")  # not validated yet: a row without AP, still curves
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "report"
    r = cli("report", run, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "report.json").read_text())[0]["AP"] is None
    png = np.asarray(Image.open(out / "training.png").convert("RGB")).astype(int)
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44)]:  # one line per loss term
        assert (np.abs(png - colour).sum(-1) < 10).sum() > 50, colour


def test_rows_scored_per_source_show_one_column_per_source(tmp_path):
    """Data from several datasets: AP is the union's, the AP columns are each source's own images
    and categories (from per_source, not per_task), and report.json keeps per_source."""
    def write(name, ap, sources):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"model": name, "split": "test", "AP": ap, "AP50": 0.8, "AP75": 0.5,
                                 "per_task": {"a": {"AP": 0.01, "AP50": 0.02, "AP75": 0.03}},
                                 "per_source": {**sources, "union": {"AP": ap, "AP50": 0.8, "AP75": 0.5, "images": 40}},
                                 "params": 1000, "gflops": 0.01}))
        return p

    teacher = write("teacher-a", 0.40, {"a": {"AP": 0.40, "AP50": 0.7, "AP75": 0.4, "images": 20}})
    raw = write("raw", 0.30, {"a": {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "images": 20},
                              "b": {"AP": 0.35, "AP50": 0.6, "AP75": 0.3, "images": 20}})
    rows = load_rows([teacher, raw])
    md = rows_markdown(rows)
    assert "| Model | split | checkpoint | AP | AP50 | AP75 | AP a | AP b | #param. | FLOPs | train |" in md
    assert "| teacher-a | test | – | 40.00 | 80.00 | 50.00 | 40.00 | – |" in md
    assert "| raw | test | – | 30.00 | 80.00 | 50.00 | 25.00 | 35.00 |" in md
    assert "union of the sources" in md
    assert [c.header for c in rows_table(rows).columns][6:8] == ["AP a", "AP b"]
    write_report(rows, {}, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved[1]["per_source"]["b"] == {"AP": 0.35, "AP50": 0.6, "AP75": 0.3}
    assert saved[1]["per_source"]["union"]["AP"] == 0.30
