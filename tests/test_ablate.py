"""kacli ablate: the paper's ablation rows in both scenarios, summarised over seeds on the test split,
its claims checked on paired per-seed differences, the label-free rows scored from their last epoch,
reruns reused and mismatched reruns refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import assert_one_line_error

from kacli.ablate import (
    ROW_NAMES,
    SCENARIO_ROWS,
    ablation_markdown,
    ablation_rows,
    ablation_settings,
    check_claims,
    gt_loss_comparison,
    parse_rows,
    parse_settings,
    row_checkpoint,
    run_ablation,
    summarize,
)
from kacli.amalgamation.config import AmalgamateConfig, check_method
from kacli.config import apply_overrides
from kacli.demo import RECIPE
from kacli.errors import KacliError
from kacli.fsutil import write_yaml


def _run(row, seed, ap, tasks=(0.5, 0.4)):
    return {"row": row, "seed": seed, "AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1,
            "per_task": {"convex": {"AP": tasks[0]}, "concave": {"AP": tasks[1]}}, "train_seconds": 10.0}


def _teacher(task, seed, ap):
    return {"row": f"teacher-{task}", "seed": seed, "AP": ap, "AP50": ap, "AP75": ap,
            "per_task": {task: {"AP": ap}}, "train_seconds": 5.0, "checkpoint": "best.pt"}


def _stdev(values):
    """The sample standard deviation, computed by hand."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _claims(runs, scenario="split"):
    rows = list(dict.fromkeys(r["row"] for r in runs))
    return {c["claim"]: c for c in check_claims(summarize(runs, rows, scenario), scenario)}


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [_run("raw", 0, 0.40, (0.5, 0.3)), _run("raw", 1, 0.44, (0.7, 0.1)), _run("sa+ta", 0, 0.5)]
    rows = summarize(runs, ["raw", "sa+ta", "sag"])
    assert [r["row"] for r in rows] == ["raw", "sa+ta"]  # rows without runs are left out
    raw = rows[0]
    assert raw["seeds"] == [0, 1] and raw["label"] == "Raw"
    assert raw["AP"] == pytest.approx(0.42) and raw["AP_std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert raw["per_task"]["convex"] == pytest.approx({"AP": 0.6, "AP_std": math.sqrt(2 * 0.1**2)})
    assert list(raw["per_task"]) == ["convex", "concave"]  # the manifest's task order
    assert raw["by_seed"][1] == {"seed": 1, "AP": 0.44, "per_task": {"convex": 0.7, "concave": 0.1}}
    assert rows[1]["AP_std"] == 0.0
    assert raw["checkpoint"] == "best.pt" and raw["checkpoint_rule"] == "best on val"
    lf = summarize([_run("sa+ta-lf", 0, 0.4)], ["sa+ta-lf"])[0]
    assert lf["checkpoint"] == "last.pt" and lf["checkpoint_rule"] == "last epoch"
    cross = summarize([_run("raw", 0, 0.4)], ["raw"], "cross-dataset")[0]
    assert cross["label"] == "Raw (naive merge)"


# Two seeds of every split row: (seed 0, seed 1) AP.
SPLIT_AP = {
    "sa-compressed": (0.50, 0.52), "sag": (0.46, 0.50), "sa": (0.45, 0.53), "ta": (0.50, 0.57),
    "sa+ta": (0.55, 0.56), "sa+ta-lf": (0.53, 0.535), "redundancy": (0.54, 0.55),
    "redundancy-ours": (0.53, 0.52), "isometric": (0.53, 0.53), "random": (0.40, 0.52),
    "raw": (0.449, 0.45), "raw-ext": (0.435, 0.46),
}


def test_split_claims_are_the_mean_and_std_of_paired_per_seed_differences():
    runs = [_run(row, s, ap) for row, aps in SPLIT_AP.items() for s, ap in enumerate(aps)]
    claims = _claims(runs)
    fair = claims["SA (compressed) > SAG (Table V, the paper's fair comparison)"]
    # per seed: 50 − 46 = +4, 52 − 50 = +2 points
    assert fair["difference"] == pytest.approx(3.0) and fair["difference_std"] == pytest.approx(math.sqrt(2))
    assert fair["holds"] is True and fair["same_sign"] is True and fair["seeds_holding"] == 2
    assert fair["AP_a"] == pytest.approx(51.0) and fair["AP_b"] == pytest.approx(48.0)
    assert [p["difference"] for p in fair["per_seed"]] == pytest.approx([4.0, 2.0])
    plain = claims["SA (uncompressed) > SAG"]  # −1 and +3: holds on the mean, not on every seed
    assert plain["difference"] == pytest.approx(1.0) and plain["difference_std"] == pytest.approx(math.sqrt(8))
    assert plain["holds"] is True and plain["same_sign"] is False and plain["seeds_holding"] == 1
    # the std is the paired differences', not the rows' spreads combined: +5 and −1
    vs_ta = claims["SA+TA > TA"]
    assert vs_ta["difference"] == pytest.approx(2.0) and vs_ta["difference_std"] == pytest.approx(math.sqrt(18))
    assert claims["SA+TA > SA"]["difference"] == pytest.approx(6.5)
    lf = claims["SA+TA (LF) within 2 AP of SA+TA"]  # −2 and −2.5
    assert lf["difference"] == pytest.approx(-2.25) and lf["holds"] is False and lf["seeds_holding"] == 1
    paper = claims["redundancy (paper: teacher-guided) ≥ isometric (Fig. 6b)"]
    assert paper["difference"] == pytest.approx(1.5) and paper["holds"] is True
    ours = claims["redundancy (ours: guided 1/3) ≥ isometric (Fig. 6b)"]  # 0 and −1: equal counts as ≥
    assert ours["difference"] == pytest.approx(-0.5) and ours["holds"] is False and ours["seeds_holding"] == 1
    assert claims["isometric ≥ random (Fig. 6b)"]["difference"] == pytest.approx(7.0)
    raw_ext = claims["Raw-ext < Raw (the paper: 43.5 vs 44.9)"]  # −1.4 and +1.0
    assert raw_ext["difference"] == pytest.approx(-0.2) and raw_ext["holds"] is True
    assert raw_ext["same_sign"] is False
    assert raw_ext["difference_std"] == pytest.approx(_stdev([-1.4, 1.0]))


def test_claims_pair_only_the_seeds_both_rows_have_and_one_seed_has_no_std():
    one = _claims([_run("sa-compressed", 0, 0.5), _run("sag", 0, 0.47), _run("sag", 1, 0.1)])
    fair = one["SA (compressed) > SAG (Table V, the paper's fair comparison)"]
    assert fair["seeds"] == [0] and fair["difference"] == pytest.approx(3.0)
    assert fair["difference_std"] is None and fair["same_sign"] is None
    assert one["SA+TA > SA"]["holds"] is None and one["SA+TA > SA"]["difference"] is None


def test_the_student_against_its_teachers_per_task_and_seed():
    runs = [_run("sa+ta", 0, 0.56, (0.60, 0.53)), _run("sa+ta", 1, 0.56, (0.58, 0.54)),
            _teacher("convex", 0, 0.60), _teacher("convex", 1, 0.58),
            _teacher("concave", 0, 0.55), _teacher("concave", 1, 0.60)]
    claim = _claims(runs)["SA+TA per task ≥ 0.95× its teacher"]
    assert claim["per_task"]["convex"]["ratio"] == pytest.approx(1.0)
    concave = claim["per_task"]["concave"]  # 0.53 / 0.55 and 0.54 / 0.60
    assert concave["ratio"] == pytest.approx((0.53 / 0.55 + 0.9) / 2)
    assert concave["ratio_std"] == pytest.approx(_stdev([0.53 / 0.55, 0.9]))
    assert concave["AP"] == pytest.approx(53.5) and concave["AP_teacher"] == pytest.approx(57.5)
    assert claim["holds"] is False and claim["seeds_holding"] == 1  # seed 0 holds, seed 1 does not
    assert [p["holds"] for p in claim["per_seed"]] == [True, False]
    without = _claims([_run("sa+ta", 0, 0.56)])["SA+TA per task ≥ 0.95× its teacher"]
    assert without["holds"] is None


def test_cross_dataset_claims_and_the_ground_truth_losses():
    ap = {"raw": (0.40, 0.41), "raw-partial": (0.45, 0.43), "pseudo": (0.42, 0.46), "student": (0.47, 0.45),
          "student-slim": (0.465, 0.44), "student-marginal": (0.48, 0.46), "student-none": (0.42, 0.43),
          "student-pseudo-gt": (0.46, 0.44), "raw-partial-marginal": (0.46, 0.45)}
    runs = [_run(row, s, v, (v + 0.01, v - 0.01)) for row, aps in ap.items() for s, v in enumerate(aps)]
    runs += [_teacher("convex", s, 0.50) for s in (0, 1)] + [_teacher("concave", s, 0.47) for s in (0, 1)]
    rows = list(dict.fromkeys(r["row"] for r in runs))
    summary = summarize(runs, rows, "cross-dataset")
    claims = {c["claim"]: c for c in check_claims(summary, "cross-dataset")}
    best = claims["student > best baseline (raw, raw-partial, pseudo) on the union"]
    # seed 0: 47 − 45 (raw-partial) = +2; seed 1: 45 − 46 (pseudo) = −1; the means alone would give +2
    assert [p["b"] for p in best["per_seed"]] == ["raw-partial", "pseudo"]
    assert best["difference"] == pytest.approx(0.5) and best["difference_std"] == pytest.approx(math.sqrt(4.5))
    assert best["holds"] is True and best["same_sign"] is False
    slim = claims["slim within 1 AP of student"]  # −0.5 and −1.0
    assert slim["difference"] == pytest.approx(-0.75) and slim["holds"] is True and slim["same_sign"] is True
    teacher = claims["student per source ≥ 0.9× its teacher"]  # convex 0.48 / 0.5 and 0.46 / 0.5
    assert teacher["per_task"]["convex"]["ratio"] == pytest.approx(0.94) and teacher["seeds_holding"] == 2
    assert teacher["per_task"]["concave"]["ratio"] == pytest.approx((0.46 / 0.47 + 0.44 / 0.47) / 2)
    assert teacher["holds"] is True
    fams = {f["family"]: f for f in gt_loss_comparison(summary)}
    student = fams["student (ka)"]
    assert [(e["gt_loss"], e["row"]) for e in student["entries"]] == [
        ("mask", "student"), ("marginal", "student-marginal"), ("none", "student-none"),
        ("pseudo-gt", "student-pseudo-gt")]
    assert [e["AP"] for e in student["entries"]] == pytest.approx([46.0, 47.0, 42.5, 45.0])
    assert student["best"] == "marginal"
    assert student["entries"][1]["vs_mask"]["difference"] == pytest.approx(1.0)
    assert student["entries"][2]["vs_mask"]["difference"] == pytest.approx(-3.5)
    assert student["entries"][0]["vs_mask"] is None
    detr = fams["plain DETR"]
    assert detr["best"] == "marginal" and detr["best_row"] == "raw-partial-marginal"


def test_markdown_reports_the_test_images_the_checkpoints_and_the_paired_claims():
    runs = [_run(row, s, ap) for row, aps in SPLIT_AP.items() for s, ap in enumerate(aps)]
    summary = summarize(runs, list(SPLIT_AP), "split")
    result = {"scenario": "split", "seeds": 2, "rows": summary, "claims": check_claims(summary, "split"),
              "test_images": {0: 123, 1: 123}}
    md = ablation_markdown(result)
    assert "pycocotools on the 123 test images" in md and "mean ± std over 2 seeds" in md
    assert "| SA+TA (LF) | Table V | last epoch | 53.2 ± 0.4 |" in md
    assert "| SA, compressed | Table V | best on val | 51.0 ± 1.4 |" in md
    assert ("| SA (compressed) > SAG (Table V, the paper's fair comparison) | 51.0 vs 48.0 | +3.0 ± 1.4 "
            "| 2/2, same sign | ✓ |") in md
    assert "| SA (uncompressed) > SAG | 49.0 vs 48.0 | +1.0 ± 2.8 | 1/2, sign differs | ✓ |" in md


def test_rows_of_both_scenarios_load_and_name_what_they_are():
    for scenario in ("split", "cross-dataset"):
        rows = {r.name: r for r in ablation_rows(scenario)}
        assert tuple(rows) == SCENARIO_ROWS[scenario]
        for r in rows.values():  # every row is a valid amalgamate configuration that can train
            cfg = apply_overrides(AmalgamateConfig(), dict(r.overrides))
            check_method(cfg, 2, ["proj", "enc0"])
    assert ROW_NAMES == SCENARIO_ROWS["split"]
    rows = {r.name: r for r in ablation_rows("split")}
    assert rows["sa+ta-lf"].overrides["lambda_d"] == 0 and rows["ta-lf"].overrides["sa.enabled"] is False
    assert rows["sag"].overrides["method"] == "sag" and rows["sag"].overrides["ta.enabled"] is False
    # the paper's fair comparison: SA alone, compressed to n tokens by the teachers' tokens throughout
    sa_c = rows["sa-compressed"].overrides
    assert (sa_c["method"], sa_c["ta.enabled"], sa_c["compress"], sa_c["compress_guide"]) == (
        "ka", False, "redundancy", 1.0)
    assert rows["redundancy"].overrides["compress_guide"] == 1.0 and "paper" in rows["redundancy"].label
    assert rows["redundancy-ours"].overrides["compress_guide"] == RECIPE["slim_compress_guide"]
    assert rows["redundancy-ours"].label == "SA+TA, redundancy (ours: guided 1/3)"
    assert {rows[n].overrides["compress"] for n in ("redundancy", "redundancy-ours", "isometric", "random")} == {
        "redundancy", "isometric", "random"}
    cross = {r.name: r for r in ablation_rows("cross-dataset")}
    assert all("gt_loss" in r.overrides for r in cross.values())  # a later default changes no row
    assert {n: cross[n].overrides["gt_loss"] for n in ("student", "student-marginal", "student-none",
                                                       "student-pseudo-gt", "student-slim")} == {
        "student": "mask", "student-marginal": "marginal", "student-none": "none",
        "student-pseudo-gt": "pseudo-gt", "student-slim": "mask"}
    assert cross["raw-partial-marginal"].overrides == {"method": "raw-partial", "gt_loss": "marginal"}
    assert cross["student-slim"].overrides["compress_guide"] == RECIPE["slim_compress_guide"]
    assert parse_rows("sa+ta, raw") == ["raw", "sa+ta"] and parse_rows(None) == list(ROW_NAMES)
    assert parse_rows("pseudo,student", "cross-dataset") == ["pseudo", "student"]
    with pytest.raises(KacliError, match="unknown ablation row"):
        parse_rows("raw,SA-TA")
    with pytest.raises(KacliError, match="belong to the cross-dataset scenario, not split"):
        parse_rows("raw,student-marginal")
    with pytest.raises(KacliError, match="belong to the split scenario, not cross-dataset"):
        parse_rows("sa-compressed", "cross-dataset")
    with pytest.raises(KacliError, match="unknown ablation scenario"):
        parse_rows(None, "coco")
    assert parse_settings(["ta.noobj_weight=0", "sa.stats=teacher"]) == {"ta.noobj_weight": 0, "sa.stats": "teacher"}
    with pytest.raises(KacliError, match="KEY=VALUE"):
        parse_settings(["ta.noobj_weight"])


def test_label_free_rows_are_scored_from_their_last_epoch():
    split = {r.name: r for r in ablation_rows("split")}
    chosen = {name: row_checkpoint(r) for name, r in split.items()}
    assert {n for n, c in chosen.items() if c == "last.pt"} == {"ta-lf", "sa+ta-lf"}
    assert set(chosen.values()) == {"best.pt", "last.pt"}
    assert all(row_checkpoint(r) == "best.pt" for r in ablation_rows("cross-dataset"))
    # --set lambda_d=0 makes every ka and sag row label-free; the DETR baselines stay on labels
    assert row_checkpoint(split["sa+ta"], {"lambda_d": 0}) == "last.pt"
    assert row_checkpoint(split["sag"], {"lambda_d": 0}) == "last.pt"
    assert row_checkpoint(split["raw"], {"lambda_d": 0}) == "best.pt"
    assert row_checkpoint(split["raw-ext"], {"lambda_d": 0}) == "best.pt"
    assert row_checkpoint(split["sa+ta-lf"], {"lambda_d": 0.5}) == "best.pt"


def test_wrong_scenario_rows_and_an_unknown_scenario_are_refused_in_one_line(cli, tmp_path):
    r = cli("ablate", "--out", tmp_path / "a", "--rows", "raw,student-marginal")
    assert_one_line_error(r, "student-marginal", "cross-dataset scenario")
    r = cli("ablate", "--out", tmp_path / "a", "--scenario", "cross-dataset", "--rows", "sa-compressed")
    assert_one_line_error(r, "sa-compressed", "split scenario")
    r = cli("ablate", "--out", tmp_path / "a", "--scenario", "coco")
    assert_one_line_error(r, "unknown ablation scenario", "cross-dataset")
    assert not (tmp_path / "a").exists()


def test_a_rerun_with_another_scenario_or_an_older_folder_is_refused(cli, tmp_path):
    out = tmp_path / "ablation"
    out.mkdir()
    write_yaml(out / "ablate.yaml", ablation_settings("split", 0.4, {}, 48, 16, 16))
    before = (out / "ablate.yaml").read_bytes()
    with pytest.raises(KacliError, match="holds a split ablation, not a cross-dataset one"):
        run_ablation(out, minutes=0.4, scenario="cross-dataset", train_images=48, val_images=16, test_images=16)
    r = cli("ablate", "--out", out, "--scenario", "cross-dataset", "--minutes", "0.4")
    assert_one_line_error(r, "split ablation")
    assert (out / "ablate.yaml").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["ablate.yaml"]
    write_yaml(out / "ablate.yaml", {**ablation_settings("split", 0.4, {}, 48, 16, 16), "format": "kacli-ablation/1"})
    with pytest.raises(KacliError, match="older kacli"):
        run_ablation(out, minutes=0.4, train_images=48, val_images=16, test_images=16)


def test_help_names_the_scenarios_and_every_row(cli):
    r = cli("ablate", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.replace("│", " ").split())
    for scenario, rows in SCENARIO_ROWS.items():
        assert f"{scenario}:" in text or f"--scenario {scenario}" in text, scenario
        for name in rows:
            assert f" {name}," in text or f" {name}." in text or f" {name} " in text, name
    assert "SA compressed" in text and "teacher-guided" in text


def _kacli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kacli", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_ablate_runs_rows_for_each_seed_on_the_test_split_and_a_rerun_reuses_them(tmp_path):
    rows = ("raw", "raw-ext", "sa+ta-lf")
    args = ["ablate", "--out", "abl", "--minutes", "0.4", "--seeds", "2", "--rows", ",".join(rows),
            "--train-images", "48", "--val-images", "16", "--test-images", "12"]
    first = _kacli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "abl"
    result = json.loads((out / "ablation.json").read_text())
    teachers = ["teacher-convex", "teacher-concave", "ensemble"]
    assert [r["row"] for r in result["rows"]] == [*teachers, *rows]
    assert all(r["seeds"] == [0, 1] for r in result["rows"])
    assert {(r["row"], r["seed"]) for r in result["runs"]} == {(n, s) for n in (*teachers, *rows) for s in (0, 1)}
    assert result["scenario"] == "split" and result["test_images"] == {"0": 12, "1": 12}
    for s in (0, 1):
        for name in (*teachers, *rows):
            evals = json.loads((out / f"seed-{s}" / "eval" / f"{name}.json").read_text())
            run = next(r for r in result["runs"] if (r["row"], r["seed"]) == (name, s))
            assert evals["split"] == "test" and run["AP"] == evals["AP"]
        lf = json.loads((out / f"seed-{s}" / "eval" / "sa+ta-lf.json").read_text())
        assert lf["checkpoint"].endswith("sa+ta-lf/last.pt")
        raw = json.loads((out / f"seed-{s}" / "eval" / "raw.json").read_text())
        assert raw["checkpoint"].endswith("raw/best.pt")
    by_row = {r["row"]: r for r in result["rows"]}
    assert by_row["sa+ta-lf"]["checkpoint"] == "last.pt" and by_row["raw"]["checkpoint"] == "best.pt"
    assert by_row["teacher-convex"]["per_task"].keys() == {"convex"}
    md = (out / "ablation.md").read_text()
    assert "| Raw-ext | baseline | best on val |" in md and "| SA+TA (LF) | Table V | last epoch |" in md
    assert "pycocotools on the 12 test images" in md and "Raw-ext < Raw" in md and "over 2 seeds" in md
    assert "| Teacher convex | teachers | best on val |" in md
    assert (out / "curves.png").stat().st_size > 1000
    # a rerun trains and evaluates nothing again
    stamp = (out / "seed-1" / "runs" / "raw-ext" / "best.pt").stat().st_mtime_ns
    evaluated = (out / "seed-1" / "eval" / "sa+ta-lf.json").stat().st_mtime_ns
    again = _kacli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "seed-1" / "runs" / "raw-ext" / "best.pt").stat().st_mtime_ns == stamp
    assert (out / "seed-1" / "eval" / "sa+ta-lf.json").stat().st_mtime_ns == evaluated
    # other settings or another scenario in the same folder: one line, exit 2, nothing touched
    before = (out / "ablation.json").read_bytes()
    other = _kacli(*args, "--set", "ta.noobj_weight=0", cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "ablation with other settings" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    cross = _kacli("ablate", "--out", "abl", "--scenario", "cross-dataset", "--minutes", "0.4", "--seeds", "2",
                   "--rows", "raw", "--train-images", "48", "--val-images", "16", "--test-images", "12", cwd=tmp_path)
    assert cross.returncode == 2 and "split ablation" in cross.stderr and len(cross.stderr.strip().splitlines()) == 1
    assert (out / "ablation.json").read_bytes() == before
    bad = _kacli("ablate", "--out", "x", "--set", "ta.no_such_key=1", cwd=tmp_path)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr and not (tmp_path / "x").exists()


def test_ablate_refuses_a_demo_folder_of_the_other_scenario(tmp_path):
    """--demo lends a demo's teachers; a demo of the other scenario has other data and teachers."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text('{"seed": 0, "scenario": "cross-dataset"}\n')
    (demo / "cache.h5").write_bytes(b"")
    with pytest.raises(KacliError, match="cross-dataset demo"):
        run_ablation(tmp_path / "ablation", demos=[demo])
    (demo / "demo.json").write_text('{"seed": 0, "scenario": "split"}\n')
    with pytest.raises(KacliError, match="is a split demo; the cross-dataset ablation"):
        run_ablation(tmp_path / "ablation", demos=[demo], scenario="cross-dataset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no ablation folder, no temporary one
