"""``kacli ablate``: the paper's ablations (Table V, Fig. 6b) on the demo's data and teachers.

Every row is one ``amalgamate`` run with the demo's student schedule (:func:`kacli.demo.student_schedule`),
evaluated on the validation split; ``--seeds S`` repeats every row for demo seeds 0 … S−1 (each
seed its own data, teachers and cache, as ``kacli demo --seed s`` makes them) and reports mean ±
standard deviation. Everything is kept on disk and reused: a rerun continues where the last one
stopped, and a demo folder (``--demo``) lends its teachers and cache to its seed.

Layout of ``out``::

    ablate.yaml                       the settings (a rerun must use the same)
    seed-<s>/base/                    data, tasks, teachers, cache.h5 (unless a --demo of seed s)
    seed-<s>/runs/<row>/              each row's run (best.pt, last.pt, metrics.jsonl)
    seed-<s>/eval/<row>.json          its evaluation (kacli eval --json)
    ablation.json, ablation.md        every run, the mean ± std table, the paper's orderings checked
    curves.png                        validation AP per epoch, mean over seeds (the paper's Fig. 4c)
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from kacli.amalgamate import amalgamate
from kacli.amalgamation.config import AmalgamateConfig
from kacli.config import apply_overrides
from kacli.data.manifest import TaskManifest
from kacli.demo import (
    DESIGN_MINUTES,
    RECIPE,
    prepare_base,
    run_finished,
    run_train_seconds,
    scaled_epochs,
    student_schedule,
)
from kacli.errors import KacliError
from kacli.eval.evaluate import evaluate_checkpoints
from kacli.fsutil import atomic_file, load_json, load_yaml, write_json, write_yaml
from kacli.progress import shared_progress
from kacli.report import load_curves, plot_curves


@dataclass(frozen=True)
class Row:
    """One ablation row: its name on the command line, its label in the table, the group of the
    paper's table it belongs to, and the amalgamate settings that make it."""

    name: str
    label: str
    group: str
    overrides: Mapping[str, Any]


def _rows(lambda_d: float, guide: float) -> tuple[Row, ...]:
    gt = {"lambda_d": lambda_d}
    return (
        Row("raw", "Raw", "baseline", {"method": "raw"}),
        Row("raw-ext", "Raw-ext", "baseline", {"method": "raw-ext"}),
        Row("sa", "SA", "Table V", {"method": "ka", "ta.enabled": False, **gt}),
        Row("sag", "SAG", "Table V", {"method": "sag", "ta.enabled": False, **gt}),
        Row("ta", "TA", "Table V", {"method": "ka", "sa.enabled": False, **gt}),
        Row("ta-lf", "TA (LF)", "Table V", {"method": "ka", "sa.enabled": False, "lambda_d": 0.0}),
        Row("sa+ta", "SA+TA", "Table V", {"method": "ka", **gt}),
        Row("sa+ta-lf", "SA+TA (LF)", "Table V", {"method": "ka", "lambda_d": 0.0}),
        Row("redundancy", "SA+TA, redundancy", "Fig. 6b",
            {"method": "ka", "compress": "redundancy", "compress_guide": guide, **gt}),
        Row("isometric", "SA+TA, isometric", "Fig. 6b", {"method": "ka", "compress": "isometric", **gt}),
        Row("random", "SA+TA, random", "Fig. 6b", {"method": "ka", "compress": "random", **gt}),
    )


def ablation_rows() -> tuple[Row, ...]:
    """The rows, with the demo recipe's ground-truth weight and slim-student guidance."""

    return _rows(RECIPE["student_lambda_d"], RECIPE["slim_compress_guide"])


ROW_NAMES = tuple(r.name for r in _rows(1.0, 1.0))

# The paper's claims, as (description, row a, relation, row b, tolerance): Table V and Fig. 6b.
CLAIMS = (
    ("SA > SAG (Table V)", "sa", ">", "sag", 0.0),
    ("SA+TA > SA", "sa+ta", ">", "sa", 0.0),
    ("SA+TA > TA", "sa+ta", ">", "ta", 0.0),
    ("SA+TA (LF) within 2 AP of SA+TA", "sa+ta-lf", "within", "sa+ta", 2.0),
    ("redundancy ≥ isometric (Fig. 6b)", "redundancy", ">=", "isometric", 0.0),
    ("isometric ≥ random (Fig. 6b)", "isometric", ">=", "random", 0.0),
    ("Raw-ext differs from Raw", "raw-ext", "differs", "raw", 0.0),
)


def parse_rows(spec: str | None) -> list[str]:
    """``"raw,sa+ta"`` → the named rows in table order; None or ``all`` → every row."""
    if spec is None or spec.strip() == "all":
        return list(ROW_NAMES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown or not names:
        raise KacliError(f"unknown ablation row(s) {', '.join(unknown) or repr(spec)} (rows: {', '.join(ROW_NAMES)})")
    return [n for n in ROW_NAMES if n in names]


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
        except yaml.YAMLError:
            raise KacliError(f"--set {key.strip()}: {value!r} is not a YAML value") from None
    return out


def _check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse unknown or ill-typed keys before anything trains (one-line KacliError)."""

    apply_overrides(AmalgamateConfig(), dict(settings))


def _demo_seed(demo: Path) -> int:
    """The seed a demo folder was made with (its demo.json), checking it holds a cache and teachers."""

    summary = demo / "demo.json"
    if not summary.is_file():
        raise KacliError("not a finished kacli demo folder (no demo.json)", demo)
    recorded = load_json(summary)
    scenario = recorded.get("scenario", "split")
    if scenario != "split":
        raise KacliError(f"is a {scenario} demo; the ablation runs on the split demo's tasks and teachers", demo)
    seed = recorded.get("seed")
    if not isinstance(seed, int):
        raise KacliError("demo.json does not record the demo's seed (made by an older kacli; rerun the demo)", summary)
    if not (demo / "cache.h5").is_file():
        raise KacliError("demo folder has no cache.h5", demo)
    return seed


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: Sequence[Mapping], rows: Sequence[str]) -> list[dict]:
    """Per row, over its seeds: mean and standard deviation of AP, AP50, AP75 and each task's AP
    (fractions, as eval writes them)."""
    labels = {r.name: r for r in ablation_rows()}
    out = []
    for name in rows:
        mine = [r for r in runs if r["row"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {"row": name, "label": labels[name].label, "group": labels[name].group,
                                 "seeds": [r["seed"] for r in mine]}
        for key in ("AP", "AP50", "AP75"):
            entry[key], entry[f"{key}_std"] = _mean_std([r.get(key) for r in mine])
        tasks = list(dict.fromkeys(t for r in mine for t in (r.get("per_task") or {})))
        entry["per_task"] = {}
        for t in tasks:
            mean, std = _mean_std([(r.get("per_task") or {}).get(t, {}).get("AP") for r in mine])
            entry["per_task"][t] = {"AP": mean, "AP_std": std}
        entry["train_seconds"] = _mean_std([r.get("train_seconds") for r in mine])[0]
        out.append(entry)
    return out


def check_claims(summary: Sequence[Mapping]) -> list[dict]:
    """The paper's orderings on the mean AP (in points): holds True/False, or None where a row is missing."""
    ap = {r["row"]: (None if r["AP"] is None else 100 * r["AP"]) for r in summary}
    out = []
    for text, a, rel, b, tol in CLAIMS:
        x, y = ap.get(a), ap.get(b)
        if x is None or y is None:
            holds = None
        elif rel == ">":
            holds = x > y
        elif rel == ">=":
            holds = x >= y
        elif rel == "within":
            holds = abs(x - y) <= tol
        else:  # differs: beyond rounding of the printed table
            holds = abs(x - y) >= 0.05
        out.append({"claim": text, "a": a, "b": b, "AP_a": x, "AP_b": y,
                    "difference": None if x is None or y is None else x - y, "holds": holds})
    return out


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 and std is not None else "")


def summary_cells(summary: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per summary row (AP values in %, ``mean ± std`` over seeds):
    what both the Markdown and the rich table show."""
    tasks = list(dict.fromkeys(t for r in summary for t in r["per_task"]))
    head = ["Row", "Group", "AP", "AP50", "AP75", *[f"AP {t}" for t in tasks], "train"]
    rows = []
    for r in summary:
        n = len(r["seeds"])
        rows.append([r["label"], r["group"], *(_fmt(r[k], r[f"{k}_std"], n) for k in ("AP", "AP50", "AP75")),
                     *(_fmt(r["per_task"].get(t, {}).get("AP"), r["per_task"].get(t, {}).get("AP_std"), n)
                       for t in tasks),
                     "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"])
    return head, rows


def _claim_cells(c: Mapping) -> tuple[str, str]:
    nums = "–" if c["difference"] is None else f"{c['AP_a']:.1f} vs {c['AP_b']:.1f} ({c['difference']:+.1f})"
    return nums, {True: "✓", False: "✗", None: "–"}[c["holds"]]


def ablation_markdown(summary: Sequence[Mapping], claims: Sequence[Mapping], seeds: int) -> str:
    head, rows = summary_cells(summary)
    lines = [
        f"# Ablation on the demo data ({seeds} seed{'s' if seeds != 1 else ''}: mean ± standard deviation)",
        "",
        "| " + " | ".join(head) + " |",
        "|:---|:---|" + "---:|" * (len(head) - 2),
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "", "AP in %, pycocotools on the 300 validation images; LF = label-free (no ground truth).", "",
        "| the paper's claim | AP | holds |", "|:---|---:|:---:|",
    ]
    lines += [f"| {c['claim']} | {' | '.join(_claim_cells(c))} |" for c in claims]
    return "\n".join(lines) + "\n"


def ablation_table(result: Mapping):
    """``run_ablation``'s result as a rich table, the paper's claims in its caption."""
    from rich.table import Table

    head, rows = summary_cells(result["rows"])
    table = Table(title=f"Ablation ({result['seeds']} seed(s), mean ± std)")
    for h in head:
        table.add_column(h, justify="left" if h in ("Row", "Group") else "right")
    for cells in rows:
        table.add_row(*cells)
    table.caption = "\n".join(f"{c['claim']}: {' '.join(_claim_cells(c))}" for c in result["claims"])
    return table


def run_ablation(
    out: str | Path,
    minutes: float = 12.0,
    seeds: int = 1,
    rows: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    demos: Sequence[str | Path] = (),
    train_images: int | None = None,
    val_images: int | None = None,
) -> dict:
    """Run (or continue) the ablation into ``out``; returns what ablation.json holds.

    Args:
        out: the ablation folder (see the module docstring); reused when its ablate.yaml matches.
        minutes: the demo's budget, which scales every training's epochs (``kacli demo --minutes``).
        seeds: demo seeds 0 … seeds−1.
        rows: row names (default: all, :data:`ROW_NAMES`).
        settings: amalgamate overrides applied to every row after the row's own.
        demos: finished demo folders lending their data, teachers and cache to their seed.
        train_images, val_images: the generated data's size (default the demo's 2,000 and 300).

    Raises:
        KacliError: bad arguments, a folder of another ablation, a demo folder that is not one.
    """

    if not minutes > 0:
        raise KacliError(f"--minutes must be positive, got {minutes}")
    if seeds < 1:
        raise KacliError(f"--seeds must be at least 1, got {seeds}")
    rows = list(rows or ROW_NAMES)
    settings = dict(settings or {})
    _check_settings(settings)
    lent = {}
    for d in demos:
        d = Path(d)
        lent.setdefault(_demo_seed(d), d)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KacliError("output exists and is not a folder", out)
    recorded = {"format": "kacli-ablation/1", "minutes": float(minutes), "settings": settings,
                "train_images": train_images or RECIPE["train_images"], "val_images": val_images or RECIPE["val_images"]}
    marker = out / "ablate.yaml"
    if marker.is_file():
        before = load_yaml(marker) or {}
        if {k: before.get(k) for k in recorded} != recorded:
            raise KacliError("folder holds an ablation with other settings (--minutes, --set or image counts); "
                             "use another --out",
                             marker)
    elif out.exists() and any(out.iterdir()):
        raise KacliError("output folder exists, is not empty and is not an ablation folder", out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(marker, recorded)

    by_name = {r.name: r for r in ablation_rows()}
    teacher_epochs = scaled_epochs(RECIPE["teacher_epochs"], minutes)
    t_start = time.perf_counter()
    runs: list[dict] = []
    curves: dict[str, dict[int, list[float]]] = {}
    seconds: dict[int, float] = {}
    quiet = lambda msg: None  # noqa: E731

    with shared_progress(unit="run") as progress:
        overall = progress.add_task("kacli ablate", total=seeds * (len(rows) + 1), info="")
        for seed in range(seeds):
            t_seed = time.perf_counter()
            base = lent.get(seed, out / f"seed-{seed}" / "base")
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
                TaskManifest(tasks_path)
            else:
                _, tasks_path = prepare_base(base, seed, teacher_epochs, recorded["train_images"],
                                             recorded["val_images"], _Stage)
            progress.update(overall, advance=1)
            schedule = student_schedule(minutes, seed)
            for name in rows:
                row = by_name[name]
                run = out / f"seed-{seed}" / "runs" / name
                result = out / f"seed-{seed}" / "eval" / f"{name}.json"
                progress.update(overall, info=f"seed {seed}: {row.label}")
                if not run_finished(run, schedule["train.epochs"]):
                    resume = (run / "last.pt").is_file()
                    amalgamate(base / "cache.h5", tasks_path, out_dir=run, resume=resume,
                               force=run.exists() and not resume,
                               overrides={**schedule, **row.overrides, **settings}, log=quiet)
                if not result.is_file():
                    metrics = evaluate_checkpoints([run], tasks_path)
                    metrics["train_seconds"] = run_train_seconds(run)
                    write_json(result, metrics)
                metrics = json.loads(result.read_text())
                runs.append({"row": name, "seed": seed, **{k: metrics.get(k) for k in
                                                           ("AP", "AP50", "AP75", "per_task", "train_seconds")}})
                for epoch, ap in load_curves([run]).get(run.name, []):
                    curves.setdefault(row.label, {}).setdefault(int(epoch), []).append(ap)
                progress.update(overall, advance=1)
            seconds[seed] = round(time.perf_counter() - t_seed, 1)

    summary = summarize(runs, rows)
    claims = check_claims(summary)
    result = {"rows": summary, "claims": claims, "runs": runs, "seeds": seeds, "minutes": minutes,
              "settings": settings, "seconds_per_seed": seconds, "seconds": round(time.perf_counter() - t_start, 1),
              "epochs": {"teacher": teacher_epochs, "student": student_schedule(minutes, 0)["train.epochs"]},
              "design_minutes": DESIGN_MINUTES}
    write_json(out / "ablation.json", result)

    with atomic_file(out / "ablation.md", encoding="utf-8") as f:
        f.write(ablation_markdown(summary, claims, seeds))
    mean_curves = {label: [(e, statistics.fmean(v)) for e, v in sorted(points.items())]
                   for label, points in curves.items()}
    plot_curves(mean_curves, out / "curves.png")
    return result


__all__ = ["ROW_NAMES", "Row", "ablation_markdown", "ablation_rows", "ablation_table", "check_claims", "parse_rows",
           "parse_settings", "run_ablation", "summarize", "summary_cells"]
