"""Reports over runs: the paper's Table I (rich and Markdown), its Fig. 4 curves, report.json.

Inputs are eval JSON files (written by ``kacli eval --json``) and run directories (with
``metrics.jsonl``, one JSON object per line, and ``eval.json`` when the run was evaluated).
Each input becomes one row::

    {"model", "split", "checkpoint", "AP", "AP50", "AP75", "per_task": {task: {"AP", "AP50", "AP75"}},
     "params", "gflops", "train_seconds"}

``split`` names the images the AP was computed on (an eval JSON's ``split``; ``val`` for a run's
validation lines) and ``checkpoint`` the model that was scored (the checkpoint file an eval JSON
names, ``best.pt`` or ``last.pt``; ``epoch N`` for a validation line); the tables show both, so a
figure on the split that selected the checkpoint is never mistaken for one on held-out images.

plus ``"per_source": {source: {"AP", "AP50", "AP75"}, "union": {...}}`` for data from several
datasets (merge-tasks), where ``AP``… are the union's and the tables show one AP column per source
instead of per task.

AP values are fractions in [0, 1] (shown as percentages); ``gflops`` is in the paper's convention
(multiply-adds, ``gflops_mac`` of ``kacli.eval.flops``). A run directory's metrics come from its
``eval.json`` when present, otherwise from the last evaluation line of ``metrics.jsonl``; its
validation curve (AP against epoch) comes from the evaluation lines of ``metrics.jsonl``, and its
training curves (every loss term and the learning rate against epoch) from all its lines.

A run still training can be reported: a last line still being written (no newline yet) is left
out, and a run with no validation yet gives a row without AP and its training curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kacli.engine.runlog import read_jsonl
from kacli.errors import KacliError
from kacli.eval.by_source import UNION
from kacli.fsutil import atomic_file, atomic_path, load_json

METRIC_KEYS = ("AP", "AP50", "AP75")
ROW_KEYS = ("model", "split", "checkpoint", "AP", "AP50", "AP75", "per_task", "params", "gflops", "train_seconds")
TITLE = "TABLE I: knowledge amalgamation results"


# --------------------------------------------------------------------------------------- loading


def _number(value, what: str, path: Path, line: int | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        where = f" on line {line}" if line else ""
        raise KacliError(f"{what} is {value!r}{where}, expected a number", path)
    return float(value)


def _gflops(value, path: Path) -> float | None:
    """``gflops`` in an eval JSON: the dict of ``kacli.eval.flops.gflops`` or a plain number (MACs)."""
    if isinstance(value, Mapping):
        value = value.get("gflops_mac")
    return _number(value, "gflops", path)


def _per_task(value, path: Path, key: str = "per_task") -> dict:
    """``{name: {"AP", "AP50", "AP75"}}`` of an eval JSON's ``per_task`` (or ``per_source``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise KacliError(f"{key} is not an object", path)
    out = {}
    for name, m in value.items():
        if not isinstance(m, Mapping):
            raise KacliError(f"{key}[{name!r}] is not an object", path)
        out[str(name)] = {k: _number(m.get(k), f"{key}[{name!r}].{k}", path) for k in METRIC_KEYS}
    return out


def _row_from_eval(data, path: Path, default_name: str) -> dict:
    if not isinstance(data, Mapping) or "AP" not in data:
        raise KacliError('not an eval JSON (no "AP"; write one with kacli eval --json)', path)
    params = data.get("params")
    if isinstance(params, Mapping):
        params = params.get("total")
    row = {
        "model": str(data.get("model") or default_name),
        "split": str(data["split"]) if isinstance(data.get("split"), str) else None,
        "checkpoint": _checkpoint_name(data),
        **{k: _number(data.get(k), k, path) for k in METRIC_KEYS},
        "per_task": _per_task(data.get("per_task"), path),
        "params": None if params is None else int(_number(params, "params", path)),
        "gflops": _gflops(data.get("gflops"), path),
        "train_seconds": _number(data.get("train_seconds"), "train_seconds", path),
    }
    return _with_sources(row, data, path)


def _checkpoint_name(data: Mapping) -> str | None:
    """The file name of the checkpoint an eval JSON scored (``best.pt``, ``last.pt``); an ensemble's
    members' names joined with ``+`` when they differ; None when it names none."""
    members = data.get("members") if isinstance(data.get("members"), list) else []
    paths = [m.get("checkpoint") for m in members if isinstance(m, Mapping)] or [data.get("checkpoint")]
    names = [Path(p).name for p in paths if isinstance(p, str) and p]
    if not names:
        return None
    return "+".join(dict.fromkeys(names))


def _with_sources(row: dict, data: Mapping, path: Path) -> dict:
    """``row`` plus ``per_source`` when ``data`` (an eval JSON or a metrics line) scored sources."""
    if data.get("per_source") is not None:
        row["per_source"] = _per_task(data["per_source"], path, "per_source")
    return row


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` (blank lines skipped); a malformed line is a one-line error
    naming the file and the line."""
    path = Path(path)
    records = []
    for n, _, rec in read_jsonl(path):  # a torn last line (being written, or a killed run's) left out
        if not isinstance(rec, dict):
            raise KacliError(f"line {n} is not a JSON object", path)
        if "epoch" not in rec:
            raise KacliError(f'line {n} has no "epoch"', path)
        _number(rec["epoch"], "epoch", path, n)
        for k in (*METRIC_KEYS, "train_seconds"):
            _number(rec.get(k), k, path, n)
        records.append(rec)
    return records


def is_training_term(key: str) -> bool:
    """Keys of a metrics line drawn as training curves: the loss terms and the learning rate."""
    return key in ("total", "loss", "lr") or key.startswith("loss_")


def training_curves(records: Sequence[Mapping]) -> dict[str, list[tuple[float, float]]]:
    """Loss term or ``lr`` → [(epoch, value)] over the lines of a ``metrics.jsonl``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for k, v in r.items():
            if is_training_term(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, []).append((float(r["epoch"]), float(v)))
    return out


def _load_run_dir(path: Path) -> tuple[dict, list[tuple[float, float]], dict]:
    metrics_path, eval_path = path / "metrics.jsonl", path / "eval.json"
    if not metrics_path.is_file() and not eval_path.is_file():
        raise KacliError("not a run directory (no metrics.jsonl or eval.json)", path)
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    evals = [r for r in records if r.get("AP") is not None]
    curve = [(float(r["epoch"]), float(r["AP"])) for r in evals]
    seconds = [r["train_seconds"] for r in records if r.get("train_seconds") is not None]
    if eval_path.is_file():
        row = _row_from_eval(load_json(eval_path), eval_path, path.name)
    elif evals:
        last = evals[-1]
        row = _with_sources({
            "model": path.name,
            "split": "val",
            "checkpoint": f"epoch {last['epoch']:g}",
            **{k: _number(last.get(k), k, metrics_path) for k in METRIC_KEYS},
            "per_task": _per_task(last.get("per_task"), metrics_path),
            "params": None,
            "gflops": None,
            "train_seconds": None,
        }, last, metrics_path)
    elif records:  # still training, not validated yet
        row = {"model": path.name, "split": None, "checkpoint": None, **{k: None for k in METRIC_KEYS},
               "per_task": {}, "params": None,
               "gflops": None, "train_seconds": None}  # fmt: skip
    else:
        raise KacliError("no epoch finished yet (metrics.jsonl holds no line) and no eval.json", path)
    if row["train_seconds"] is None and seconds:
        row["train_seconds"] = float(seconds[-1])
    return row, curve, training_curves(records)


def load_inputs(paths: Iterable[str | Path]) -> tuple[list[dict], dict[str, list[tuple[float, float]]]]:
    """Rows (one per input, in order) and validation curves (run name → [(epoch, AP)], for run
    directories with evaluation lines). Model names that repeat get " (2)", " (3)"... appended."""
    rows, curves, _ = load_all(paths)
    return rows, curves


def load_all(paths: Iterable[str | Path]) -> tuple[list[dict], dict, dict[str, dict[str, list[tuple[float, float]]]]]:
    """:func:`load_inputs` plus the training curves: run name → {loss term or ``lr`` → [(epoch, value)]}."""
    rows, curves, training, seen = [], {}, {}, {}
    for p in map(Path, paths):
        train: dict = {}
        if p.is_dir():
            row, curve, train = _load_run_dir(p)
        elif p.is_file() and p.suffix.lower() == ".json":
            row, curve = _row_from_eval(load_json(p), p, p.stem), []
        elif p.exists():
            raise KacliError("neither an eval JSON (kacli eval --json) nor a run directory", p)
        else:
            raise KacliError("not found", p)
        seen[row["model"]] = seen.get(row["model"], 0) + 1
        if seen[row["model"]] > 1:
            row["model"] = f"{row['model']} ({seen[row['model']]})"
        rows.append(row)
        if curve:
            curves[row["model"]] = curve
        if train:
            training[row["model"]] = train
    return rows, curves, training


def load_rows(paths: Iterable[str | Path]) -> list[dict]:
    """One row per eval JSON or run directory (see the module docstring)."""
    return load_inputs(paths)[0]


def load_curves(paths: Iterable[str | Path]) -> dict[str, list[tuple[float, float]]]:
    """Run name → [(epoch, validation AP)] for the run directories among ``paths``."""
    return load_inputs(paths)[1]


# ------------------------------------------------------------------------------------ formatting


def _by_source(rows: Sequence[Mapping]) -> bool:
    """Whether the rows were scored per source (data from several datasets)."""
    return any(r.get("per_source") for r in rows)


def _task_names(rows: Sequence[Mapping]) -> list[str]:
    """The names of the per-group AP columns: the sources (the union aside) when the rows were
    scored per source, else the tasks."""

    key = "per_source" if _by_source(rows) else "per_task"
    names: list[str] = []
    for r in rows:
        for t in r.get(key) or {}:
            if t not in names and not (key == "per_source" and t == UNION):
                names.append(t)
    return names


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _params(p: int | float | None) -> str:
    if p is None:
        return "–"
    m = p / 1e6
    return f"{m:.1f}M" if m >= 10 else f"{m:.2f}M"


def _gf(g: float | None) -> str:
    if g is None:
        return "–"
    return f"{g:.1f}G" if g >= 1 else f"{g:.3g}G"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _baseline(rows: Sequence[Mapping]) -> Mapping | None:
    return next((r for r in rows if r["model"] == "raw"), None)


def _cells(row: Mapping, tasks: Sequence[str], raw: Mapping | None, gain: str = " {}") -> list[str]:
    """Table cells of one row. Student rows also show their gain over ``raw`` in AP points, as the
    paper's Table I does (formatted through ``gain``)."""
    metrics = []
    for k in METRIC_KEYS:
        cell = _pct(row.get(k))
        if raw is not None and row["model"].startswith("student") and None not in (row.get(k), raw.get(k)):
            cell += gain.format(f"({100 * (row[k] - raw[k]):+.2f})")
        metrics.append(cell)
    per_task = (row.get("per_source") if row.get("per_source") else row.get("per_task")) or {}
    task_cells = [_pct((per_task.get(t) or {}).get("AP")) for t in tasks]
    return [
        row["model"],
        row.get("split") or "–",
        row.get("checkpoint") or "–",
        *metrics,
        *task_cells,
        _params(row.get("params")),
        _gf(row.get("gflops")),
        _duration(row.get("train_seconds")),
    ]


def _headers(tasks: Sequence[str], short: bool = False) -> list[str]:
    return ["Model", "split", "ckpt" if short else "checkpoint", "AP", "AP50", "AP75", *[f"AP {t}" for t in tasks], "#param.", "FLOPs",
            "train"]


def rows_table(rows: Sequence[Mapping]) -> Table:
    """The rows as a rich table: AP columns in percent (2 decimals), one AP column per task,
    parameters in millions, FLOPs as GMACs (the paper's convention). A student's gain over raw
    goes on a second line of its cell so the table fits an 80-column terminal."""
    tasks = _task_names(rows)
    raw = _baseline(rows)
    body = [_cells(dict(r, model=escape(r["model"])), tasks, raw, gain="\n[green]{}[/]") for r in rows]
    table = Table(
        title=TITLE,
        caption="AP in %" + ("; AP, AP50, AP75 of the union of the sources, AP <source> on its own images"
                              if _by_source(rows) else "") + "; FLOPs = multiply-adds (the paper's convention)",
        box=box.SIMPLE_HEAVY,
        show_edge=False,
        collapse_padding=True,
    )
    for i, h in enumerate(_headers(tasks, short=True)):
        lines = [line for row in body for line in Text.from_markup(row[i]).plain.splitlines()]
        width = min(24, max(len(x) for x in [h, *lines]))
        table.add_column(escape(h), justify="left" if i < 3 else "right", no_wrap=True, min_width=width)
    for cells in body:
        table.add_row(*cells)
    return table


def rows_markdown(rows: Sequence[Mapping]) -> str:
    """The rows as a Markdown table titled like the paper's Table I."""
    tasks = _task_names(rows)
    headers = _headers(tasks)
    raw = _baseline(rows)
    lines = [
        f"## {TITLE}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] * 3 + ["---:"] * (len(headers) - 3)) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, tasks, raw)) + " |")
    scope = (
        "AP, AP50 and AP75 are COCO-style (pycocotools) on the split each row names, in %, over the union of the "
        "sources: each category scored on the images of the sources that annotate it (a detection of a category "
        "an image's source does not annotate counts neither way); AP <source> scores each source on its own "
        "images and categories. " if _by_source(rows) else
        "AP, AP50, AP75 and the per-task AP are COCO-style (pycocotools) on the split each row names, in %. "
    )
    lines += [
        "",
        scope + "FLOPs count multiply-adds, as the paper does. "
        + ("Student rows show their gain over raw in AP points." if raw is not None else ""),
    ]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------- files


def _save_png(fig, path: str | Path) -> Path:
    """Lay out ``fig`` and write it as PNG to ``path`` under a temporary name, renamed when complete."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_curves(runs: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """Validation AP (in %) against epoch, one line per run, as the paper's Fig. 4; written as PNG
    (atomically) to ``path``. With no runs the figure says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    many = len(runs) > 6  # an ablation's rows: the legend goes beside the plot, styles vary too
    fig = Figure(figsize=(8.5 if many else 6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(runs.items()):
        pts = sorted(points)
        if pts:
            ax.plot([e for e, _ in pts], [100 * ap for _, ap in pts], marker="os^D"[i // 10 % 4], markersize=3,
                    linestyle=("-", "--")[i // 10 % 2], label=name)
    if any(runs.values()):
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        else:
            ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no validation curves", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AP (%)")
    ax.set_title("Average precision (COCO style) learning curves")
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


def plot_training(runs: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | Path) -> Path:
    """Training curves, one panel per run: every loss term against epoch (log scale when all are
    positive; ``total`` drawn thicker) and the learning rate (dashed, right axis). PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(runs) or ["(no runs)"]
    fig = Figure(figsize=(7, 2.8 * len(names)), dpi=110)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        terms = runs.get(name, {})
        losses = {k: sorted(v) for k, v in terms.items() if k != "lr" and v}
        for k, pts in losses.items():
            ax.plot([e for e, _ in pts], [y for _, y in pts], label=k, linewidth=2.2 if k == "total" else 1.0,
                    marker="o" if len(pts) < 30 else None, markersize=2)  # fmt: skip
        if losses and all(y > 0 for pts in losses.values() for _, y in pts):
            ax.set_yscale("log")
        if terms.get("lr"):
            lr = sorted(terms["lr"])
            ax2 = ax.twinx()
            ax2.plot([e for e, _ in lr], [y for _, y in lr], color="grey", linestyle="--", linewidth=1)
            ax2.set_ylabel("learning rate (dashed)")
        if losses:
            ax.legend(loc="upper right", fontsize=6, ncol=2)
        else:
            ax.text(0.5, 0.5, "no training lines", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


def write_report(
    rows: Sequence[Mapping], curves: Mapping[str, Sequence], out_dir: str | Path, training: Mapping | None = None
) -> dict[str, Path]:
    """Write ``report.json`` (the rows), ``report.md`` and ``curves.png`` into ``out_dir`` (and
    ``training.png`` when ``training`` curves are given), each under a temporary name and renamed
    when complete. Returns name → path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KacliError("output exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.json": out / "report.json", "report.md": out / "report.md", "curves.png": out / "curves.png"}
    with atomic_file(files["report.json"], encoding="utf-8") as f:
        json.dump([{**{k: r.get(k) for k in ROW_KEYS}, **({"per_source": r["per_source"]} if "per_source" in r else {})}
                   for r in rows], f, indent=2)
        f.write("\n")
    with atomic_file(files["report.md"], encoding="utf-8") as f:
        f.write(rows_markdown(rows))
    plot_curves(curves, files["curves.png"])
    if training:
        files["training.png"] = plot_training(training, out / "training.png")
    return files
