"""kacli ablate: the paper's ablation rows, summarised over seeds, its claims checked, reruns reused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from kacli.ablate import ROW_NAMES, ablation_rows, check_claims, parse_rows, parse_settings, run_ablation, summarize
from kacli.amalgamation.config import AmalgamateConfig
from kacli.config import apply_overrides
from kacli.errors import KacliError


def _run(row, seed, ap, tasks=(0.5, 0.4)):
    return {"row": row, "seed": seed, "AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1,
            "per_task": {"convex": {"AP": tasks[0]}, "concave": {"AP": tasks[1]}}, "train_seconds": 10.0}


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [_run("raw", 0, 0.40, (0.5, 0.3)), _run("raw", 1, 0.44, (0.7, 0.1)), _run("sa+ta", 0, 0.5)]
    rows = summarize(runs, ["raw", "sa+ta", "sag"])
    assert [r["row"] for r in rows] == ["raw", "sa+ta"]  # rows without runs are left out
    raw = rows[0]
    assert raw["seeds"] == [0, 1] and raw["label"] == "Raw"
    assert raw["AP"] == pytest.approx(0.42) and raw["AP_std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert raw["per_task"]["convex"] == pytest.approx({"AP": 0.6, "AP_std": math.sqrt(2 * 0.1**2)})
    assert list(raw["per_task"]) == ["convex", "concave"]  # the manifest's task order
    assert rows[1]["AP_std"] == 0.0


def test_claims_are_checked_on_the_mean_ap():
    ap = {"sa": 0.40, "sag": 0.41, "sa+ta": 0.45, "ta": 0.43, "sa+ta-lf": 0.425, "redundancy": 0.44,
          "isometric": 0.44, "random": 0.30, "raw": 0.35, "raw-ext": 0.35}
    claims = {c["claim"]: c for c in check_claims(summarize([_run(r, 0, v) for r, v in ap.items()], list(ap)))}
    assert claims["SA > SAG (Table V)"]["holds"] is False
    assert claims["SA > SAG (Table V)"]["difference"] == pytest.approx(-1.0)
    assert claims["SA+TA > SA"]["holds"] and claims["SA+TA > TA"]["holds"]
    assert claims["SA+TA (LF) within 2 AP of SA+TA"]["holds"] is False  # 2.5 points apart
    assert claims["redundancy ≥ isometric (Fig. 6b)"]["holds"]  # equal counts as ≥
    assert claims["isometric ≥ random (Fig. 6b)"]["holds"]
    assert claims["Raw-ext differs from Raw"]["holds"] is False
    partial = check_claims(summarize([_run("sa", 0, 0.4)], ["sa"]))
    assert all(c["holds"] is None for c in partial)


def test_rows_are_the_papers_and_their_settings_load():
    rows = {r.name: r for r in ablation_rows()}
    assert tuple(rows) == ROW_NAMES
    for r in rows.values():  # every row is a valid amalgamate configuration
        apply_overrides(AmalgamateConfig(), dict(r.overrides))
    assert rows["sa+ta-lf"].overrides["lambda_d"] == 0 and rows["ta-lf"].overrides["sa.enabled"] is False
    assert rows["sag"].overrides["method"] == "sag" and rows["sag"].overrides["ta.enabled"] is False
    assert {rows[n].overrides["compress"] for n in ("redundancy", "isometric", "random")} == {
        "redundancy", "isometric", "random"}
    assert parse_rows("sa+ta, raw") == ["raw", "sa+ta"] and parse_rows(None) == list(ROW_NAMES)
    with pytest.raises(KacliError, match="unknown ablation row"):
        parse_rows("raw,SA-TA")
    assert parse_settings(["ta.noobj_weight=0", "sa.stats=teacher"]) == {"ta.noobj_weight": 0, "sa.stats": "teacher"}
    with pytest.raises(KacliError, match="KEY=VALUE"):
        parse_settings(["ta.noobj_weight"])


def _kacli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kacli", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_ablate_runs_rows_for_each_seed_and_a_rerun_reuses_them(tmp_path):
    args = ["ablate", "--out", "abl", "--minutes", "0.4", "--seeds", "2", "--rows", "raw,raw-ext",
            "--train-images", "48", "--val-images", "16"]
    first = _kacli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "abl"
    result = json.loads((out / "ablation.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["raw", "raw-ext"]
    assert all(r["seeds"] == [0, 1] for r in result["rows"])
    assert {(r["row"], r["seed"]) for r in result["runs"]} == {(n, s) for n in ("raw", "raw-ext") for s in (0, 1)}
    for s in (0, 1):
        evals = json.loads((out / f"seed-{s}" / "eval" / "raw.json").read_text())
        run = next(r for r in result["runs"] if (r["row"], r["seed"]) == ("raw", s))
        assert run["AP"] == evals["AP"]
    md = (out / "ablation.md").read_text()
    assert "| Raw-ext | baseline |" in md and "Raw-ext differs from Raw" in md
    assert (out / "curves.png").stat().st_size > 1000
    # a rerun trains nothing again
    stamp = (out / "seed-1" / "runs" / "raw-ext" / "best.pt").stat().st_mtime_ns
    again = _kacli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "seed-1" / "runs" / "raw-ext" / "best.pt").stat().st_mtime_ns == stamp
    # other settings in the same folder: one line, exit 2, nothing touched
    before = (out / "ablation.json").read_bytes()
    other = _kacli(*args, "--set", "ta.noobj_weight=0", cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "ablation with other settings" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert (out / "ablation.json").read_bytes() == before
    bad = _kacli("ablate", "--out", "x", "--set", "ta.no_such_key=1", cwd=tmp_path)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr and not (tmp_path / "x").exists()


def test_ablate_refuses_a_cross_dataset_demo_folder(tmp_path):
    """--demo lends a split demo's teachers; a cross-dataset demo's are of other tasks and data."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text('{"seed": 0, "scenario": "cross-dataset"}\n')
    (demo / "cache.h5").write_bytes(b"")
    with pytest.raises(KacliError, match="cross-dataset demo"):
        run_ablation(tmp_path / "ablation", demos=[demo])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no ablation folder, no temporary one
