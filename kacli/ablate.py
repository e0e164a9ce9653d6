"""``kacli ablate``: the paper's ablations (Table V, Fig. 6b) on the demo's data and teachers, and
the cross-dataset comparison of the students, their ground-truth losses and the baselines.

Two scenarios, the demo's (:data:`kacli.demo.SCENARIOS`), each with its own rows
(:data:`SCENARIO_ROWS`):

- ``split`` (the paper's setting, Table V and Fig. 6b): raw, raw-ext, SA, SA compressed (the
  paper's fair comparison with SAG), SAG, TA, SA+TA, the label-free variants, and the compression
  strategies (redundancy guided by the teachers' tokens as the paper does, redundancy guided as
  the demo's slim student, isometric, random).
- ``cross-dataset``: two sources, each half of the images annotated for one task's categories; the
  student with each ground-truth loss (mask, marginal, none, pseudo-gt), the slim student, and the
  baselines (raw = naive merge, raw-partial with the mask and the marginal loss, pseudo).

Every row is one ``amalgamate`` run with the demo's student schedule (:func:`kacli.demo.student_schedule`);
``--seeds S`` repeats every row for demo seeds 0 … S−1 (each seed its own data, teachers and
cache, as ``kacli demo --seed s`` makes them). The teachers and their ensemble are rows too,
evaluated (not trained) from each seed's base.

Every figure is on the ``test`` split, which no run looks at while training. Rows trained with
ground truth are scored from ``best.pt`` (chosen on the validation AP); the label-free rows (λ_d 0)
from ``last.pt``, the last epoch, since choosing on the validation AP would use labels
(:func:`row_checkpoint`). The paper's claims are checked on the mean over seeds of the paired
per-seed differences (same seed: same data, teachers and cache), with their standard deviation and
whether every seed agrees in sign.

Everything is kept on disk and reused: a rerun continues where the last one stopped, and a demo
folder of the same scenario (``--demo``) lends its data, teachers and cache to its seed.

Layout of ``out``::

    ablate.yaml                       the settings, the scenario among them (a rerun must use the same)
    seed-<s>/base/                    data, tasks, teachers, cache.h5 (unless a --demo of seed s)
    seed-<s>/runs/<row>/              each row's run (best.pt, last.pt, metrics.jsonl)
    seed-<s>/eval/<row>.json          its evaluation on the test split (kacli eval --json), and
                                      teacher-<task>.json, ensemble.json
    ablation.json, ablation.md        every run, the mean ± std table, the paper's claims checked
    curves.png                        validation AP per epoch, mean over seeds (the paper's Fig. 4c)
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

from kacli import limits
from kacli.amalgamate import amalgamate
from kacli.amalgamation.config import AmalgamateConfig
from kacli.config import apply_overrides
from kacli.data.manifest import TaskManifest
from kacli.demo import (
    DESIGN_MINUTES,
    RECIPE,
    check_arch,
    prepare_base,
    run_finished,
    run_train_seconds,
    scenario_teacher_epochs,
    student_schedule,
)
from kacli.errors import KacliError
from kacli.eval.by_source import sources_of
from kacli.eval.evaluate import evaluate_checkpoints
from kacli.fsutil import atomic_file, load_json, load_yaml, write_json, write_yaml
from kacli.progress import shared_progress
from kacli.report import load_curves, plot_curves

FORMAT = "kacli-ablation/2"
TEST_SPLIT = "test"
SCENARIOS = ("split", "cross-dataset")
# What each checkpoint file is, as the tables say it.
CHECKPOINT_RULES = {"best.pt": "best on val", "last.pt": "last epoch"}


@dataclass(frozen=True)
class Row:
    """One ablation row: its name on the command line, its label in the table, the group it
    belongs to (the paper's table or figure), and the amalgamate settings that make it."""

    name: str
    label: str
    group: str
    overrides: Mapping[str, Any]


def _fraction(guide: float) -> str:
    """0.33 → ``1/3``: the compress_guide fraction as the labels say it."""
    f = Fraction(guide).limit_denominator(10)
    return str(f) if abs(float(f) - guide) < 0.01 else f"{guide:g}"


def _split_rows(lambda_d: float, guide: float) -> tuple[Row, ...]:
    gt = {"lambda_d": lambda_d}
    paper = {"compress": "redundancy", "compress_guide": 1.0}  # the teachers' tokens choose, all along
    return (
        Row("raw", "Raw", "baseline", {"method": "raw"}),
        Row("raw-ext", "Raw-ext", "baseline", {"method": "raw-ext"}),
        Row("sa", "SA", "Table V", {"method": "ka", "ta.enabled": False, **gt}),
        Row("sa-compressed", "SA, compressed", "Table V", {"method": "ka", "ta.enabled": False, **paper, **gt}),
        Row("sag", "SAG", "Table V", {"method": "sag", "ta.enabled": False, **gt}),
        Row("ta", "TA", "Table V", {"method": "ka", "sa.enabled": False, **gt}),
        Row("ta-lf", "TA (LF)", "Table V", {"method": "ka", "sa.enabled": False, "lambda_d": 0.0}),
        Row("sa+ta", "SA+TA", "Table V", {"method": "ka", **gt}),
        Row("sa+ta-lf", "SA+TA (LF)", "Table V", {"method": "ka", "lambda_d": 0.0}),
        Row("redundancy", "SA+TA, redundancy (paper: teacher-guided)", "Fig. 6b", {"method": "ka", **paper, **gt}),
        Row("redundancy-ours", f"SA+TA, redundancy (ours: guided {_fraction(guide)})", "Fig. 6b",
            {"method": "ka", "compress": "redundancy", "compress_guide": guide, **gt}),
        Row("isometric", "SA+TA, isometric", "Fig. 6b", {"method": "ka", "compress": "isometric", **gt}),
        Row("random", "SA+TA, random", "Fig. 6b", {"method": "ka", "compress": "random", **gt}),
    )


def _cross_rows(lambda_d: float, guide: float) -> tuple[Row, ...]:
    # Every row names its ground-truth loss, so that a change of the default leaves its meaning.
    ka = {"method": "ka", "lambda_d": lambda_d, "compress": "none"}
    return (
        Row("raw", "Raw (naive merge)", "baseline", {"method": "raw", "gt_loss": "none"}),
        Row("raw-partial", "Raw-partial (gt mask)", "baseline", {"method": "raw-partial", "gt_loss": "mask"}),
        Row("raw-partial-marginal", "Raw-partial (gt marginal)", "gt loss",
            {"method": "raw-partial", "gt_loss": "marginal"}),
        Row("pseudo", "Pseudo (gt pseudo-gt)", "baseline", {"method": "pseudo", "gt_loss": "pseudo-gt"}),
        Row("student", "Student (gt mask)", "student", {**ka, "gt_loss": "mask"}),
        Row("student-marginal", "Student (gt marginal)", "gt loss", {**ka, "gt_loss": "marginal"}),
        Row("student-none", "Student (gt none)", "gt loss", {**ka, "gt_loss": "none"}),
        Row("student-pseudo-gt", "Student (gt pseudo-gt)", "gt loss", {**ka, "gt_loss": "pseudo-gt"}),
        Row("student-slim", f"Student slim (redundancy, guided {_fraction(guide)})", "student",
            {**ka, "compress": "redundancy", "compress_guide": guide, "gt_loss": "mask"}),
    )


_ROW_MAKERS = {"split": _split_rows, "cross-dataset": _cross_rows}


def _scenario(scenario: str) -> str:
    if scenario not in _ROW_MAKERS:
        raise KacliError(f"unknown ablation scenario {scenario!r} (scenarios: {', '.join(SCENARIOS)})")
    return scenario


def ablation_rows(scenario: str = "split") -> tuple[Row, ...]:
    """A scenario's rows, with the demo recipe's ground-truth weight and slim-student guidance."""

    return _ROW_MAKERS[_scenario(scenario)](RECIPE["student_lambda_d"], RECIPE["slim_compress_guide"])


SCENARIO_ROWS = {name: tuple(r.name for r in make(1.0, 1.0)) for name, make in _ROW_MAKERS.items()}
ROW_NAMES = SCENARIO_ROWS["split"]
TEACHERS_GROUP = "teachers"


def uses_ground_truth(overrides: Mapping[str, Any]) -> bool:
    """Whether a run with these amalgamate settings trains on ground truth: the plain-DETR methods
    and raw-ext always; ka and sag when their weight λ_d is above 0."""
    method = overrides.get("method", AmalgamateConfig.method)
    if method == "raw-ext" or AmalgamateConfig(method=method).plain_detr:
        return True
    return float(overrides.get("lambda_d", AmalgamateConfig.lambda_d)) > 0


def row_checkpoint(row: Row, settings: Mapping[str, Any] | None = None) -> str:
    """The checkpoint file a row is scored from: ``best.pt`` (chosen on the validation AP) for rows
    trained with ground truth, ``last.pt`` (the last epoch) for label-free ones, whose choice must
    not use labels. ``settings`` are the overrides applied to every row after the row's own."""
    return "best.pt" if uses_ground_truth({**row.overrides, **(settings or {})}) else "last.pt"


def parse_rows(spec: str | None, scenario: str = "split") -> list[str]:
    """``"raw,sa+ta"`` → the named rows of ``scenario`` in table order; None or ``all`` → every row."""
    names_here = SCENARIO_ROWS[_scenario(scenario)]
    if spec is None or spec.strip() == "all":
        return list(names_here)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise KacliError(f"--rows names no row: {spec!r} ({scenario} rows: {', '.join(names_here)})")
    elsewhere = [n for n in names if n not in names_here and any(n in rows for rows in SCENARIO_ROWS.values())]
    if elsewhere:
        other = next(s for s in SCENARIOS if s != scenario and elsewhere[0] in SCENARIO_ROWS[s])
        raise KacliError(f"row(s) {', '.join(elsewhere)} belong to the {other} scenario, not {scenario} "
                         f"(--scenario {other}; {scenario} rows: {', '.join(names_here)})")
    unknown = [n for n in names if n not in names_here]
    if unknown:
        raise KacliError(f"unknown ablation row(s) {', '.join(unknown)} ({scenario} rows: {', '.join(names_here)})")
    return [n for n in names_here if n in names]


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["ta.noobj_weight=0", "sa.stats=teacher"]`` → overrides (values read as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KacliError(f"--set takes KEY=VALUE (a dotted amalgamate config key), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
            raise KacliError(f"--set {key.strip()}: {value!r} is not a YAML value") from None
    return out


def _check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse unknown or ill-typed keys before anything trains (one-line KacliError)."""

    apply_overrides(AmalgamateConfig(), dict(settings))


def _demo_seed(demo: Path, scenario: str, arch: str = "detr") -> int:
    """The seed a demo folder was made with (its demo.json), checking that it is a demo of
    ``scenario`` and holds a cache, teachers and a test split."""

    summary = demo / "demo.json"
    if not summary.is_file():
        raise KacliError("not a finished kacli demo folder (no demo.json)", demo)
    recorded = load_json(summary)
    made = recorded.get("scenario", "split")
    if made != scenario:
        raise KacliError(f"is a {made} demo; the {scenario} ablation needs a {scenario} demo's tasks and teachers "
                         f"(--scenario {made} for this one)", demo)
    if recorded.get("arch", "detr") != arch:
        raise KacliError(f"is a demo of {recorded.get('arch', 'detr')} teachers; this ablation is of {arch} "
                         f"(--arch {recorded.get('arch', 'detr')} for this one)", demo)
    seed = recorded.get("seed")
    if not isinstance(seed, int):
        raise KacliError("demo.json does not record the demo's seed (made by an older kacli; rerun the demo)", summary)
    if not (demo / "cache.h5").is_file():
        raise KacliError("demo folder has no cache.h5", demo)
    tasks = demo / "tasks" / "tasks.yaml"
    if TEST_SPLIT not in TaskManifest(tasks).splits:
        raise KacliError("the demo's tasks have no test split (made by an older kacli; rerun the demo)", tasks)
    return seed


def ablation_settings(scenario: str = "split", minutes: float = 12.0, settings: Mapping[str, Any] | None = None,
                      train_images: int | None = None, val_images: int | None = None,
                      test_images: int | None = None, arch: str = "detr") -> dict[str, Any]:
    """What ablate.yaml records: a rerun into the same folder must give the same (``arch`` only when
    not ``detr``, so folders made before it continue)."""
    return ({"arch": check_arch(arch)} if arch != "detr" else {}) | {"format": FORMAT, "scenario": _scenario(scenario), "minutes": float(minutes),
            "settings": dict(settings or {}), "train_images": train_images or RECIPE["train_images"],
            "val_images": val_images or RECIPE["val_images"], "test_images": test_images or RECIPE["test_images"]}


# -- summary and claims ------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _row_info(name: str, scenario: str) -> tuple[str, str]:
    """(label, group) of a row name: the scenario's rows, the teachers and their ensemble."""
    for r in ablation_rows(scenario):
        if r.name == name:
            return r.label, r.group
    if name.startswith("teacher-"):
        return f"Teacher {name[len('teacher-'):]}", TEACHERS_GROUP
    if name == "ensemble":
        return "Ensemble (teachers)", TEACHERS_GROUP
    return name, ""


def _default_checkpoint(name: str, scenario: str) -> str:
    row = next((r for r in ablation_rows(scenario) if r.name == name), None)
    return "best.pt" if row is None else row_checkpoint(row)


def summarize(runs: Sequence[Mapping], rows: Sequence[str], scenario: str = "split") -> list[dict]:
    """Per row, over its seeds: mean and standard deviation of AP, AP50, AP75 and each task's AP
    (fractions, as eval writes them; on the cross-dataset scenario AP is the union's and a task's
    AP its source's), the checkpoint it was scored from, and each seed's values (``by_seed``) for
    the paired comparisons of :func:`check_claims`."""
    out = []
    for name in rows:
        mine = sorted((r for r in runs if r["row"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        label, group = _row_info(name, scenario)
        ckpt = mine[0].get("checkpoint") or _default_checkpoint(name, scenario)
        entry: dict[str, Any] = {"row": name, "label": mine[0].get("label", label),
                                 "group": mine[0].get("group", group), "checkpoint": ckpt,
                                 "checkpoint_rule": CHECKPOINT_RULES.get(ckpt, ckpt),
                                 "seeds": [r["seed"] for r in mine]}
        for key in ("AP", "AP50", "AP75"):
            entry[key], entry[f"{key}_std"] = _mean_std([r.get(key) for r in mine])
        tasks = list(dict.fromkeys(t for r in mine for t in (r.get("per_task") or {})))
        entry["per_task"] = {}
        for t in tasks:
            mean, std = _mean_std([(r.get("per_task") or {}).get(t, {}).get("AP") for r in mine])
            entry["per_task"][t] = {"AP": mean, "AP_std": std}
        entry["train_seconds"] = _mean_std([r.get("train_seconds") for r in mine])[0]
        entry["by_seed"] = [{"seed": r["seed"], "AP": r.get("AP"),
                             "per_task": {t: m.get("AP") for t, m in (r.get("per_task") or {}).items()}}
                            for r in mine]
        out.append(entry)
    return out


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims about the rows.

    ``relation``: ``>``, ``>=``, ``<`` (row ``a`` against ``b``; with several ``b`` rows, the best
    of them on each seed), ``within`` (|a − b| ≤ ``value`` AP points), or ``teacher`` (each task's
    AP of row ``a`` at least ``value`` × its teacher's)."""

    text: str
    a: str
    relation: str
    b: tuple[str, ...] = ()
    value: float = 0.0


def claims_for(scenario: str = "split") -> tuple[Claim, ...]:
    """The claims checked on a scenario's rows."""
    guide = _fraction(RECIPE["slim_compress_guide"])
    if _scenario(scenario) == "split":
        return (
            Claim("SA (compressed) > SAG (Table V, the paper's fair comparison)", "sa-compressed", ">", ("sag",)),
            Claim("SA (uncompressed) > SAG", "sa", ">", ("sag",)),
            Claim("SA+TA > SA", "sa+ta", ">", ("sa",)),
            Claim("SA+TA > TA", "sa+ta", ">", ("ta",)),
            Claim("SA+TA (LF) within 2 AP of SA+TA", "sa+ta-lf", "within", ("sa+ta",), 2.0),
            Claim("redundancy (paper: teacher-guided) ≥ isometric (Fig. 6b)", "redundancy", ">=", ("isometric",)),
            Claim(f"redundancy (ours: guided {guide}) ≥ isometric (Fig. 6b)", "redundancy-ours", ">=",
                  ("isometric",)),
            Claim("isometric ≥ random (Fig. 6b)", "isometric", ">=", ("random",)),
            Claim("Raw-ext < Raw (the paper: 43.5 vs 44.9)", "raw-ext", "<", ("raw",)),
            Claim("SA+TA per task ≥ 0.95× its teacher", "sa+ta", "teacher", (), 0.95),
        )
    return (
        Claim("student > best baseline (raw, raw-partial, pseudo) on the union", "student", ">",
              ("raw", "raw-partial", "pseudo")),
        Claim("student per source ≥ 0.9× its teacher", "student", "teacher", (), 0.9),
        Claim("slim within 1 AP of student", "student-slim", "within", ("student",), 1.0),
    )


def _holds(relation: str, d: float, tol: float) -> bool:
    if relation == ">":
        return d > 0
    if relation == ">=":
        return d >= 0
    if relation == "<":
        return d < 0
    return abs(d) <= tol  # within


def _sign(d: float) -> int:
    return (d > 0) - (d < 0)


def _by_seed(summary: Sequence[Mapping]) -> dict[str, dict[int, Mapping]]:
    return {r["row"]: {s["seed"]: s for s in r.get("by_seed", [])} for r in summary}


def _paired(seeds: Mapping[str, Mapping[int, Mapping]], claim: Claim) -> dict:
    """Row ``a`` against row(s) ``b`` seed by seed, in AP points."""
    mine = seeds.get(claim.a, {})
    per_seed = []
    for seed in sorted(mine):
        x = mine[seed].get("AP")
        others = [(b, seeds.get(b, {}).get(seed, {}).get("AP")) for b in claim.b]
        if x is None or any(v is None for _, v in others):
            continue
        best, y = max(others, key=lambda bv: bv[1])
        d = round(100 * (x - y), 10)  # round away float noise: equal APs compare equal
        per_seed.append({"seed": seed, "AP_a": 100 * x, "AP_b": 100 * y, "b": best, "difference": d,
                         "holds": _holds(claim.relation, d, claim.value)})
    out: dict[str, Any] = {"seeds": [p["seed"] for p in per_seed], "per_seed": per_seed}
    if not per_seed:
        return {**out, "AP_a": None, "AP_b": None, "difference": None, "difference_std": None, "holds": None,
                "same_sign": None, "seeds_holding": 0}
    diffs = [p["difference"] for p in per_seed]
    mean = round(statistics.fmean(diffs), 10)
    signs = {_sign(d) for d in diffs}
    return {**out, "AP_a": statistics.fmean(p["AP_a"] for p in per_seed),
            "AP_b": statistics.fmean(p["AP_b"] for p in per_seed), "difference": mean,
            "difference_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "holds": _holds(claim.relation, mean, claim.value),
            "same_sign": (len(signs) == 1) if len(diffs) > 1 else None,
            "seeds_holding": sum(p["holds"] for p in per_seed)}


def _teacher_ratio(seeds: Mapping[str, Mapping[int, Mapping]], claim: Claim) -> dict:
    """Each task's AP of row ``a`` over its teacher's, seed by seed (same seed: same teacher)."""
    mine = seeds.get(claim.a, {})
    per_seed = []
    for seed in sorted(mine):
        ratios = {}
        for task, ap in (mine[seed].get("per_task") or {}).items():
            teacher = seeds.get(f"teacher-{task}", {}).get(seed)
            t_ap = None if teacher is None else (teacher.get("per_task") or {}).get(task, teacher.get("AP"))
            if ap is None or not t_ap:
                continue
            ratios[task] = {"AP": 100 * ap, "AP_teacher": 100 * t_ap, "ratio": ap / t_ap}
        if ratios:
            per_seed.append({"seed": seed, "tasks": ratios,
                             "holds": all(r["ratio"] >= claim.value for r in ratios.values())})
    tasks = list(dict.fromkeys(t for p in per_seed for t in p["tasks"]))
    per_task = {}
    for t in tasks:
        vals = [p["tasks"][t] for p in per_seed if t in p["tasks"]]
        ratios = [v["ratio"] for v in vals]
        per_task[t] = {"AP": statistics.fmean(v["AP"] for v in vals),
                       "AP_teacher": statistics.fmean(v["AP_teacher"] for v in vals),
                       "ratio": statistics.fmean(ratios),
                       "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else None}
    holds = None if not per_task else all(m["ratio"] >= claim.value for m in per_task.values())
    return {"seeds": [p["seed"] for p in per_seed], "per_seed": per_seed, "per_task": per_task, "holds": holds,
            "seeds_holding": sum(p["holds"] for p in per_seed)}


def check_claims(summary: Sequence[Mapping], scenario: str = "split") -> list[dict]:
    """The paper's claims on the rows of ``summary`` (:func:`summarize`), in AP points.

    Ordering and ``within`` claims compare row ``a`` with row ``b`` seed by seed (same seed: same
    data and teachers): ``difference`` is the mean of the per-seed differences a − b,
    ``difference_std`` their sample standard deviation (None with one seed), ``holds`` the claim on
    the mean difference, ``same_sign`` whether every seed's difference has the same sign (None
    with one seed), ``seeds_holding`` on how many seeds the claim holds. Teacher claims give each
    task's ratio (mean, std over seeds) and hold when every task's mean ratio reaches the factor.
    ``holds`` is None where a row is missing."""
    seeds = _by_seed(summary)
    out = []
    for c in claims_for(scenario):
        base = {"claim": c.text, "a": c.a, "b": list(c.b), "relation": c.relation, "value": c.value}
        if c.relation == "teacher":
            out.append({**base, "kind": "teacher", **_teacher_ratio(seeds, c)})
        else:
            out.append({**base, "kind": "paired", **_paired(seeds, c)})
    return out


# The rows that differ only in their ground-truth loss on partially annotated images.
GT_LOSS_FAMILIES = (
    ("student (ka)", (("mask", "student"), ("marginal", "student-marginal"), ("none", "student-none"),
                      ("pseudo-gt", "student-pseudo-gt"))),
    ("plain DETR", (("none", "raw"), ("mask", "raw-partial"), ("marginal", "raw-partial-marginal"),
                    ("pseudo-gt", "pseudo"))),
)


def gt_loss_comparison(summary: Sequence[Mapping]) -> list[dict]:
    """The cross-dataset rows that differ only in their ground-truth loss, per family (the
    student, plain DETR): each mode's mean AP on the union (points) and per source, its paired
    difference to ``mask``, and the best mode on the mean AP (tied modes joined by `` = ``)."""
    by_row = {r["row"]: r for r in summary}
    seeds = _by_seed(summary)
    out = []
    for family, modes in GT_LOSS_FAMILIES:
        entries = []
        mask_row = dict(modes)["mask"]
        for mode, name in modes:
            r = by_row.get(name)
            if r is None or r["AP"] is None:
                continue
            vs_mask = None if name == mask_row else _paired(seeds, Claim("", name, ">", (mask_row,)))
            entries.append({"gt_loss": mode, "row": name, "AP": 100 * r["AP"],
                            "AP_std": None if r["AP_std"] is None else 100 * r["AP_std"],
                            "per_task": {t: None if m["AP"] is None else 100 * m["AP"]
                                         for t, m in r["per_task"].items()},
                            "vs_mask": None if vs_mask is None or vs_mask["difference"] is None else
                            {"difference": vs_mask["difference"], "difference_std": vs_mask["difference_std"],
                             "same_sign": vs_mask["same_sign"]}})
        if entries:
            top = max(e["AP"] for e in entries)
            best = [e for e in entries if e["AP"] == top]  # several on a tie
            out.append({"family": family, "entries": entries, "best": " = ".join(e["gt_loss"] for e in best),
                        "best_row": " = ".join(e["row"] for e in best)})
    return out


# -- tables ----------------------------------------------------------------------------------------------


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 and std is not None else "")


def summary_cells(summary: Sequence[Mapping], scenario: str = "split") -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per summary row (AP values in %, ``mean ± std`` over seeds):
    what both the Markdown and the rich table show. The cross-dataset scenario's AP is the union's
    and its per-task columns are the sources'."""
    tasks = list(dict.fromkeys(t for r in summary for t in r["per_task"]))
    cross = scenario == "cross-dataset"
    head = ["Row", "Group", "Checkpoint", "AP union" if cross else "AP", "AP50", "AP75",
            *[f"AP {t}" + (" source" if cross else "") for t in tasks], "train"]
    rows = []
    for r in summary:
        n = len(r["seeds"])
        rows.append([r["label"], r["group"], r.get("checkpoint_rule", "–"),
                     *(_fmt(r[k], r[f"{k}_std"], n) for k in ("AP", "AP50", "AP75")),
                     *(_fmt(r["per_task"].get(t, {}).get("AP"), r["per_task"].get(t, {}).get("AP_std"), n)
                       for t in tasks),
                     "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"])
    return head, rows


def _std(x: float | None) -> str:
    return "" if x is None else f" ± {x:.1f}"


def claim_cells(c: Mapping) -> tuple[str, str, str, str]:
    """(AP, difference, seeds, holds) cells of one claim."""
    mark = {True: "✓", False: "✗", None: "–"}[c["holds"]]
    n = len(c["seeds"])
    if n == 0:
        return "–", "–", "–", mark
    seeds = f"{c['seeds_holding']}/{n}"
    if c["kind"] == "teacher":
        nums = ", ".join(f"{t} {m['AP']:.1f} vs {m['AP_teacher']:.1f}" for t, m in c["per_task"].items())
        diff = ", ".join(f"{t} {m['ratio']:.2f}×" + ("" if m["ratio_std"] is None else f" ± {m['ratio_std']:.2f}")
                         for t, m in c["per_task"].items())
        return nums, diff, seeds, mark
    nums = f"{c['AP_a']:.1f} vs {c['AP_b']:.1f}"
    if c["same_sign"] is not None:
        seeds += ", same sign" if c["same_sign"] else ", sign differs"
    return nums, f"{c['difference']:+.1f}{_std(c['difference_std'])}", seeds, mark


def _images_text(result: Mapping) -> str:
    counts = sorted(set((result.get("test_images") or {}).values()))
    sources = next(iter((result.get("source_images") or {}).values()), None)
    if len(counts) == 1:
        text = f"the {counts[0]} test images"
    elif counts:
        text = "the " + " / ".join(str(c) for c in counts) + " test images of the seeds"
    else:
        text = "the test images"
    if sources:
        text += " (" + ", ".join(f"{name} source {n}" for name, n in sources.items()) + ")"
    return text


def _gt_loss_lines(comparison: Sequence[Mapping], seeds: int) -> list[str]:
    lines = []
    for fam in comparison:
        parts = []
        for e in fam["entries"]:
            vs = e["vs_mask"]
            rel = "" if vs is None else f", {vs['difference']:+.1f}{_std(vs['difference_std'])} vs mask"
            parts.append(f"{e['gt_loss']} {e['AP']:.1f}{_std(e['AP_std']) if seeds > 1 else ''}{rel}")
        lines.append(f"{fam['family']}: " + "; ".join(parts) + f" → best: {fam['best']} ({fam['best_row']})")
    return lines


def ablation_markdown(result: Mapping) -> str:
    """ablation.md: the table of rows, what it was measured on, and the paper's claims."""
    scenario, seeds = result.get("scenario", "split"), result["seeds"]
    head, rows = summary_cells(result["rows"], scenario)
    s = f"{seeds} seeds" if seeds > 1 else "1 seed"
    over = f"mean ± std over {s}" if seeds > 1 else s
    lines = [
        f"# Ablation on the demo data, {scenario} scenario ({over})",
        "",
        "| " + " | ".join(head) + " |",
        "|:---|:---|:---|" + "---:|" * (len(head) - 3),
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        f"AP in %, pycocotools on {_images_text(result)}; no run chose anything on the test split. "
        "Checkpoint: \"best on val\" = best.pt, the epoch of highest validation AP; \"last epoch\" = last.pt, "
        "for the label-free rows (choosing on the validation AP would use labels); LF = label-free (no ground truth)."
        + (" AP union: every category on the images of the source that annotates it; AP <task> source: that "
           "source's test images and categories." if scenario == "cross-dataset" else ""),
        "",
        f"## The paper's claims ({over} of the paired per-seed differences, in AP points)",
        "",
        "| claim | AP | difference | seeds holding | holds |",
        "|:---|---:|---:|:---:|:---:|",
    ]
    lines += [f"| {c['claim']} | {' | '.join(claim_cells(c))} |" for c in result["claims"]]
    if result.get("gt_loss"):
        lines += ["", f"## Ground-truth loss on partially annotated images (AP on the union, {over})", ""]
        lines += [f"- {line}" for line in _gt_loss_lines(result["gt_loss"], seeds)]
    return "\n".join(lines) + "\n"


def ablation_table(result: Mapping):
    """``run_ablation``'s result as a rich table, the paper's claims in its caption."""
    from rich.table import Table

    scenario = result.get("scenario", "split")
    head, rows = summary_cells(result["rows"], scenario)
    table = Table(title=f"Ablation, {scenario} scenario ({result['seeds']} seed(s), mean ± std), "
                        f"pycocotools on {_images_text(result)}")
    for h in head:
        table.add_column(h, justify="left" if h in ("Row", "Group", "Checkpoint") else "right")
    for cells in rows:
        table.add_row(*cells)
    caption = []
    for c in result["claims"]:
        nums, diff, seeds, mark = claim_cells(c)
        caption.append(f"{c['claim']}: {nums} ({diff}; seeds {seeds}) {mark}")
    caption += _gt_loss_lines(result.get("gt_loss") or [], result["seeds"])
    table.caption = "\n".join(caption)
    return table


# -- the runs -----------------------------------------------------------------------------------------


def _eval_current(path: Path, checkpoints: Sequence[Path]) -> bool:
    """Whether ``path`` holds the test-split evaluation of exactly ``checkpoints``."""
    if not path.is_file():
        return False
    m = load_json(path)
    members = m.get("members") or [m]
    have = [Path(x.get("checkpoint") or "").resolve() for x in members]
    return m.get("split") == TEST_SPLIT and have == [Path(p).resolve() for p in checkpoints]


def _evaluate(path: Path, checkpoints: Sequence[Path], tasks_path: Path, train_seconds: float | None) -> dict:
    """The test-split evaluation of ``checkpoints`` (their ensemble with several), kept in ``path``."""
    checkpoints = [Path(p).resolve() for p in checkpoints]  # absolute in the record: a rerun from another folder reuses it
    if not _eval_current(path, checkpoints):
        metrics = evaluate_checkpoints(list(checkpoints), tasks_path, split=TEST_SPLIT)
        metrics["train_seconds"] = train_seconds
        write_json(path, metrics)
    return json.loads(path.read_text())


def _test_images(tasks_path: Path) -> tuple[int, dict[str, int] | None]:
    """The test split's image count, and per source on a merged manifest."""
    gt = load_json(TaskManifest(tasks_path).split_json(TEST_SPLIT))
    sources = sources_of(gt)
    return len(gt["images"]), None if sources is None else {name: len(ims) for name, (ims, _) in sources.items()}


def run_ablation(
    out: str | Path,
    minutes: float = 12.0,
    seeds: int = 1,
    rows: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    demos: Sequence[str | Path] = (),
    train_images: int | None = None,
    val_images: int | None = None,
    test_images: int | None = None,
    scenario: str = "split",
    arch: str = "detr",
) -> dict:
    """Run (or continue) the ablation into ``out``; returns what ablation.json holds.

    Args:
        out: the ablation folder (see the module docstring); reused when its ablate.yaml matches.
        minutes: the demo's budget, which scales every training's epochs (``kacli demo --minutes``).
        seeds: demo seeds 0 … seeds−1.
        rows: row names of ``scenario`` (default: all, :data:`SCENARIO_ROWS`).
        settings: amalgamate overrides applied to every row after the row's own.
        demos: finished demo folders of ``scenario`` lending their data, teachers and cache to their seed.
        train_images, val_images, test_images: the generated data's size (default the demo recipe's).
        scenario: ``split`` (Table V, Fig. 6b) or ``cross-dataset``.
        arch: the teachers' architecture (``detr`` or ``conditional``; the students take it too).

    Raises:
        KacliError: bad arguments, a row of another scenario, a folder of another ablation, a demo
            folder that is not one of ``scenario``.
    """

    scenario = _scenario(scenario)
    limits.check_minutes("--minutes", minutes)
    if seeds < 1:
        raise KacliError(f"--seeds must be at least 1, got {seeds}")
    limits.check_limit("--seeds", seeds, "KACLI_MAX_SEEDS", " seeds")
    rows = parse_rows(None if rows is None else ",".join(rows), scenario)
    settings = dict(settings or {})
    _check_settings(settings)
    lent = {}
    for d in demos:
        d = Path(d)
        lent.setdefault(_demo_seed(d, scenario, arch), d)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KacliError("output exists and is not a folder", out)
    recorded = ablation_settings(scenario, minutes, settings, train_images, val_images, test_images, arch)
    marker = out / "ablate.yaml"
    if marker.is_file():
        before = load_yaml(marker) or {}
        if before.get("format") != FORMAT:
            raise KacliError("folder holds an ablation made by an older kacli (scored on the validation split); "
                             "use another --out", marker)
        if before.get("scenario") != scenario:
            raise KacliError(f"folder holds a {before.get('scenario')} ablation, not a {scenario} one (--scenario); "
                             "use another --out", marker)
        if {k: before.get(k) for k in recorded} != recorded:
            raise KacliError("folder holds an ablation with other settings (--minutes, --set or image counts); "
                             "use another --out", marker)
    elif out.exists() and any(out.iterdir()):
        raise KacliError("output folder exists, is not empty and is not an ablation folder", out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(marker, recorded)

    by_name = {r.name: r for r in ablation_rows(scenario)}
    teacher_epochs = scenario_teacher_epochs(scenario, minutes)
    t_start = time.perf_counter()
    runs: list[dict] = []
    order: list[str] = []
    curves: dict[str, dict[int, list[float]]] = {}
    seconds: dict[int, float] = {}
    images: dict[int, int] = {}
    source_images: dict[int, dict[str, int]] = {}
    quiet = lambda msg: None  # noqa: E731

    def record(name: str, seed: int, label: str, group: str, ckpt: str, metrics: Mapping) -> None:
        runs.append({"row": name, "seed": seed, "label": label, "group": group, "checkpoint": ckpt,
                     **{k: metrics.get(k) for k in ("AP", "AP50", "AP75", "per_task", "per_source", "train_seconds")}})
        if name not in order:
            order.append(name)

    with shared_progress(unit="run") as progress:
        overall = progress.add_task("kacli ablate", total=seeds * (len(rows) + 2), info="")
        for seed in range(seeds):
            t_seed = time.perf_counter()
            base = lent.get(seed, out / f"seed-{seed}" / "base")
            evals = out / f"seed-{seed}" / "eval"
            progress.update(overall, info=f"seed {seed}: data, teachers, cache")

            class _Stage:
                def __init__(self, name):
                    self.name = name

                def __enter__(self):
                    progress.update(overall, info=f"seed {seed}: {self.name}")

                def __exit__(self, *exc):
                    return False

            if seed in lent:
                tasks_path = base / "tasks" / "tasks.yaml"
                teachers = {t.name: base / "runs" / f"teacher-{t.name}" for t in TaskManifest(tasks_path).tasks}
            else:
                teachers, tasks_path = prepare_base(base, seed, teacher_epochs, recorded["train_images"],
                                                    recorded["val_images"], _Stage, scenario=scenario,
                                                    n_test=recorded["test_images"], arch=arch)
            images[seed], by_source = _test_images(tasks_path)
            if by_source is not None:
                source_images[seed] = by_source
            progress.update(overall, advance=1, info=f"seed {seed}: the teachers on the test split")
            best = {t: Path(run) / "best.pt" for t, run in teachers.items()}
            for task, run in teachers.items():
                name = f"teacher-{task}"
                metrics = _evaluate(evals / f"{name}.json", [best[task]], tasks_path, run_train_seconds(run))
                record(name, seed, *_row_info(name, scenario), "best.pt", metrics)
            metrics = _evaluate(evals / "ensemble.json", list(best.values()), tasks_path, None)
            record("ensemble", seed, *_row_info("ensemble", scenario), "best.pt", metrics)
            progress.update(overall, advance=1)

            schedule = student_schedule(minutes, seed)
            for name in rows:
                row = by_name[name]
                run = out / f"seed-{seed}" / "runs" / name
                result = evals / f"{name}.json"
                progress.update(overall, info=f"seed {seed}: {row.label}")
                if not run_finished(run, schedule["train.epochs"]):
                    result.unlink(missing_ok=True)  # an evaluation of an earlier state of the run
                    resume = (run / "last.pt").is_file()
                    amalgamate(base / "cache.h5", tasks_path, out_dir=run, resume=resume,
                               force=run.exists() and not resume,
                               overrides={**schedule, **row.overrides, **settings}, log=quiet)
                ckpt = row_checkpoint(row, settings)
                metrics = _evaluate(result, [run / ckpt], tasks_path, run_train_seconds(run))
                record(name, seed, row.label, row.group, ckpt, metrics)
                for epoch, ap in load_curves([run]).get(run.name, []):
                    curves.setdefault(row.label, {}).setdefault(int(epoch), []).append(ap)
                progress.update(overall, advance=1)
            seconds[seed] = round(time.perf_counter() - t_seed, 1)

    summary = summarize(runs, order, scenario)
    result = {"scenario": scenario, "split": TEST_SPLIT, "rows": summary, "claims": check_claims(summary, scenario),
              "gt_loss": gt_loss_comparison(summary) if scenario == "cross-dataset" else [],
              "runs": runs, "seeds": seeds, "minutes": minutes, "settings": settings,
              "test_images": images, "source_images": source_images,
              "seconds_per_seed": seconds, "seconds": round(time.perf_counter() - t_start, 1),
              "epochs": {"teacher": teacher_epochs, "student": student_schedule(minutes, 0)["train.epochs"]},
              "design_minutes": DESIGN_MINUTES}
    write_json(out / "ablation.json", result)

    with atomic_file(out / "ablation.md", encoding="utf-8") as f:
        f.write(ablation_markdown(result))
    mean_curves = {label: [(e, statistics.fmean(v)) for e, v in sorted(points.items())]
                   for label, points in curves.items()}
    plot_curves(mean_curves, out / "curves.png")
    return result


__all__ = ["CHECKPOINT_RULES", "Claim", "ROW_NAMES", "Row", "SCENARIOS", "SCENARIO_ROWS", "ablation_markdown",
           "ablation_rows", "ablation_settings", "ablation_table", "check_claims", "claim_cells", "claims_for",
           "gt_loss_comparison", "parse_rows", "parse_settings", "row_checkpoint", "run_ablation", "summarize",
           "summary_cells", "uses_ground_truth"]
