"""``kacli demo``: the whole pipeline on generated data, on a laptop CPU, in minutes.

Two scenarios (:data:`SCENARIOS`), sharing every stage:

- ``split`` (the paper's setting): make-demo-data → split-tasks (2 tasks, every image annotated
  for every category) → train a teacher per task → cache-teachers → amalgamate the student (full,
  and slim = redundancy-compressed) → the raw baseline (plain DETR on ground truth, same epochs and
  schedule as the student) → evaluate every model and the teachers' ensemble on the test split →
  report.json / report.md / curves.png / predictions/*.png.
- ``cross-dataset`` (detectors from different datasets): the generated images cut into two
  disjoint halves, one annotated for the ``convex`` shapes only and one for the ``concave`` ones
  (:mod:`kacli.data.demo_sources`), merged with merge-tasks; each teacher trains on its own half,
  the cache runs every teacher on every image, and the students and the baselines users run today
  (``raw`` = naive merge, ``raw-partial``, ``pseudo``) train on the union; every model is scored
  per source (each task on its own test images and categories) and on their union. Each teacher
  trains for the split scenario's steps: twice its epochs, on half the images.

Every training run selects its ``best.pt`` on the validation split; every reported figure is on the
test split, which no selection looked at.

The recipe (data, model, schedule) is the ``tiny`` preset; docs/DEMO.md says how it was chosen.
``arch`` picks the teachers' architecture (:data:`TEACHER_PRESETS`: ``tiny-conditional``
Conditional DETR, the default since it measured better at the same budget, or ``tiny`` DETR, the
same sizes and schedule); the students and raw take the teachers' architecture, as
``amalgamate`` does.
``--minutes`` scales every stage's epochs from the recipe's 12-minute design.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from kacli import limits
from kacli.amalgamate import amalgamate
from kacli.cache.writer import cache_teachers
from kacli.data.demo_data import make_demo_data
from kacli.data.demo_sources import write_demo_sources
from kacli.data.images import load_image
from kacli.data.manifest import TaskManifest
from kacli.data.merge import TaskSource, merge_tasks
from kacli.data.split import split_tasks
from kacli.draw import PALETTE, draw_detections
from kacli.engine.runlog import read_jsonl
from kacli.errors import KacliError
from kacli.eval.evaluate import evaluate_checkpoints, make_eval_dataset
from kacli.eval.infer import detect_batch, eval_sizes
from kacli.fsutil import atomic_path, check_output_dir, load_yaml, write_json
from kacli.models.checkpoint import build_model, load_checkpoint
from kacli.progress import shared_progress
from kacli.report import load_curves, load_rows, write_report
from kacli.teacher import train_teacher

DESIGN_MINUTES = 12.0

# Epochs and weights of each training at the 12-minute design (docs/DEMO.md).
RECIPE = {
    "train_images": 2000,
    "val_images": 300,
    # the split every reported figure is computed on; nothing selects on it
    "test_images": 500,
    "teacher_epochs": 32,
    "student_epochs": 18,
    # raw and the students alike: the learning rate drops ×0.1 for the last 2 of 18 epochs
    "student_lr_drop": 16,
    # the students' ground-truth weight λ_d (the paper's 0.1 assumes teachers near the data's
    # ceiling; these learn for 2.5 minutes, so the labels are worth as much as the teachers)
    "student_lambda_d": 1.0,
    "views": 1,
    # The slim student picks its tokens from the teachers' sequences for the first third of its
    # epochs, then from its own (docs/DEMO.md, "The slim student").
    "slim_compress_guide": 0.33,
}


# The teachers' run preset of each architecture (kacli/runconfig.py): the same data, sizes and schedule.
TEACHER_PRESETS = {"detr": "tiny", "conditional": "tiny-conditional"}


def check_arch(arch: str) -> str:
    """``arch`` if it is one of :data:`TEACHER_PRESETS`, else a KacliError."""
    if arch not in TEACHER_PRESETS:
        raise KacliError(f"--arch {arch!r} is not one of {', '.join(TEACHER_PRESETS)}")
    return arch


# The split the demo reports on, and how each run's reported checkpoint was chosen.
REPORT_SPLIT = "test"
SELECTION = "best.pt: the epoch of highest AP on the val split"


def scaled_epochs(epochs: int, minutes: float) -> int:
    """``epochs`` of the 12-minute design scaled to a ``minutes`` budget (at least 1)."""
    return max(1, round(epochs * minutes / DESIGN_MINUTES))


def prediction_pictures(
    teachers: dict[str, Path], student: Path, tasks_path: Path, out_dir: Path, count: int = 6,
    threshold: float = 0.5, split: str = REPORT_SPLIT,
) -> list[Path]:
    """The paper's Fig. 5 for a few images of ``split``: left, every teacher's boxes, each teacher
    in its own colour; right, the student's boxes. Detections scoring under ``threshold`` are left out."""
    from PIL import Image, ImageDraw

    manifest = TaskManifest(tasks_path)
    gt_path = manifest.split_json(split)
    models = {f"teacher {name}": load_checkpoint(p) for name, p in teachers.items()}
    models["student"] = load_checkpoint(student)
    built = {name: build_model(ck).eval() for name, ck in models.items()}
    datasets = {}
    for name, ck in models.items():
        datasets[name] = make_eval_dataset(gt_path, manifest.image_root(split), ck["label_map"]["ids"], *eval_sizes(ck))
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(datasets.values()))
    written = []
    for i in range(min(count, len(first))):
        raw = load_image(first.image_path(i))
        groups = {}
        for k, (name, ck) in enumerate(models.items()):
            image, target = datasets[name][i]
            res = detect_batch(built[name], image[None], torch.zeros(1, *image.shape[-2:], dtype=torch.bool),
                               target["orig_size"][None])[0]
            keep = res["scores"] >= threshold
            groups[name] = {
                "boxes": res["boxes"][keep],
                "labels": [ck["label_map"]["names"][int(c)] for c in res["labels"][keep]],
                "scores": res["scores"][keep].tolist(),
                "color": PALETTE[k % len(PALETTE)],
                "name": name,
            }
        left = draw_detections(raw, [g for n, g in groups.items() if n != "student"], min_size=256)
        right = draw_detections(raw, [groups["student"]], min_size=256)
        cap = 22
        sheet = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + cap), "white")
        sheet.paste(left, (0, cap))
        sheet.paste(right, (left.width + 8, cap))
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 4), "teachers", fill=(0, 0, 0))
        draw.text((left.width + 12, 4), "student (amalgamated)", fill=(0, 0, 0))
        path = out_dir / f"{split}_{i:02d}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(path)
    return written


def student_schedule(minutes: float, seed: int) -> dict[str, Any]:
    """The students' and raw's training overrides at a ``minutes`` budget: the recipe's epochs
    scaled, the learning rate dropped for the same last fraction, validation every 2 epochs (the
    learning curves)."""
    epochs = scaled_epochs(RECIPE["student_epochs"], minutes)
    lr_drop = max(1, round(epochs * RECIPE["student_lr_drop"] / RECIPE["student_epochs"]))
    return {"train.epochs": epochs, "train.seed": seed, "train.eval_every": 2, "train.lr_drop": lr_drop}


def _split_tasks(out: Path, seed: int) -> Path:
    """The ``split`` scenario's tasks: the generated data split by the demo's partition (split-tasks)."""

    split_tasks(str(out / "data" / "train.json"), str(out / "data" / "val.json"),
                str(out / "data" / "tasks-2.yaml"), out / "tasks", test_spec=str(out / "data" / "test.json"))
    return out / "tasks" / "tasks.yaml"


def _merged_tasks(out: Path, seed: int) -> Path:
    """The ``cross-dataset`` scenario's tasks: two sources, each half of the images annotated for one
    task's categories (``sources/``), merged as two datasets (merge-tasks)."""

    images = str(out / "data" / "images")
    sources = write_demo_sources(out / "data", out / "sources", seed, force=True)
    merge_tasks([TaskSource(task, train=str(p["train"]), val=str(p["val"]), images=images, val_images=images,
                            test=str(p["test"]) if "test" in p else None, test_images=images if "test" in p else None)
                 for task, p in sources.items()], out / "tasks")
    return out / "tasks" / "tasks.yaml"


@dataclass(frozen=True)
class Scenario:
    """How a demo's tasks come about and which models it compares.

    ``make_tasks(out, seed)`` builds ``out/tasks/tasks.yaml`` from the generated ``out/data`` (the
    stage named ``tasks_stage``); ``runs`` are the amalgamate runs in training order (row name,
    overrides on top of :func:`student_schedule`); ``rows`` their order in the report, after the
    teachers and their ensemble. ``teacher_epoch_factor`` multiplies the recipe's teacher epochs:
    a teacher that sees a fraction of the images trains for more epochs, so for the same steps."""

    name: str
    tasks_stage: str
    make_tasks: Callable[[Path, int], Path]
    runs: tuple[tuple[str, Mapping[str, Any]], ...]
    rows: tuple[str, ...]
    teacher_epoch_factor: int = 1


_KA = {"method": "ka", "lambda_d": RECIPE["student_lambda_d"]}
_STUDENTS = (
    ("student", {**_KA, "compress": "none"}),
    ("student-slim", {**_KA, "compress": "redundancy", "compress_guide": RECIPE["slim_compress_guide"]}),
)
SCENARIOS = {
    "split": Scenario("split", "split", _split_tasks, _STUDENTS + (("raw", {"method": "raw"}),),
                      ("raw", "student", "student-slim")),
    # raw on a merged manifest is the naive merge (an image's unannotated objects are background)
    "cross-dataset": Scenario(
        "cross-dataset", "merge", _merged_tasks,
        _STUDENTS + (("raw", {"method": "raw"}), ("raw-partial", {"method": "raw-partial"}),
                     ("pseudo", {"method": "pseudo"})),
        ("raw", "raw-partial", "pseudo", "student", "student-slim"),
        teacher_epoch_factor=2,  # each teacher has half the images: the split scenario's steps
    ),
}



def get_scenario(scenario: str | Scenario) -> Scenario:
    """A scenario by name (``split``, ``cross-dataset``), or the one given."""
    if isinstance(scenario, Scenario):
        return scenario
    if scenario not in SCENARIOS:
        raise KacliError(f"unknown demo scenario {scenario!r} (scenarios: {', '.join(SCENARIOS)})")
    return SCENARIOS[scenario]


def scenario_teacher_epochs(scenario: str | Scenario, minutes: float) -> int:
    """The teachers' epochs of ``scenario`` at a ``minutes`` budget (the recipe's, scaled, times the
    scenario's ``teacher_epoch_factor``)."""
    return scaled_epochs(RECIPE["teacher_epochs"] * get_scenario(scenario).teacher_epoch_factor, minutes)


def run_finished(run: Path, epochs: int) -> bool:
    """Whether the training run in ``run`` completed ``epochs`` epochs (best.pt, last.pt and the
    last epoch in metrics.jsonl)."""
    run = Path(run)
    if not ((run / "best.pt").is_file() and (run / "last.pt").is_file() and (run / "metrics.jsonl").is_file()):
        return False
    done = [rec.get("epoch", 0) for _, _, rec in read_jsonl(run / "metrics.jsonl")]
    return bool(done) and max(done) >= epochs


def prepare_base(
    out: Path, seed: int, teacher_epochs: int, n_train: int, n_val: int, stage: Callable[[str], Any],
    scenario: str | Scenario = "split", n_test: int | None = None, arch: str = "detr",
) -> tuple[dict[str, Path], Path]:
    """The demo's data, tasks, teachers and cache in ``out`` (``data/``, ``tasks/tasks.yaml``,
    ``runs/teacher-<task>``, ``cache.h5``; the cross-dataset scenario also ``sources/``); what a
    previous call finished is kept and reused. Each teacher trains on its task's images (all of
    them in ``split``, its own half in ``cross-dataset``); the cache holds every teacher on every
    training image.

    ``arch`` picks the teachers' preset (:data:`TEACHER_PRESETS`); a teacher folder of another
    architecture is refused (the folder is another demo's).

    ``stage(name)`` returns a context manager around each stage (progress and timing). Returns
    ``({task: teacher run folder}, tasks.yaml path)``.
    """

    scenario = get_scenario(scenario)
    quiet = lambda msg: None  # noqa: E731
    out = Path(out)
    tasks_path = out / "tasks" / "tasks.yaml"
    n_test = RECIPE["test_images"] if n_test is None else n_test
    with stage("data"):
        if not (out / "data" / "test.json").is_file():
            make_demo_data(out / "data", train_images=n_train, val_images=n_val, test_images=n_test, seed=seed)
    with stage(scenario.tasks_stage):
        if not tasks_path.is_file():
            scenario.make_tasks(out, seed)
    manifest = TaskManifest(tasks_path)
    teachers: dict[str, Path] = {}
    preset = TEACHER_PRESETS[check_arch(arch)]
    for t in manifest.tasks:
        run = out / "runs" / f"teacher-{t.name}"
        with stage(f"teacher {t.name}"):
            _check_teacher_arch(run, arch)
            if not run_finished(run, teacher_epochs):
                resume = (run / "last.pt").is_file()
                train_teacher(tasks_path, t.name, run, config=preset, resume=resume, force=run.exists() and not resume,
                              overrides={"train.epochs": teacher_epochs, "train.seed": seed}, log=quiet)
        teachers[t.name] = run
    with stage("cache"):
        if not (out / "cache.h5").is_file():
            cache_teachers(tasks_path, [teachers[t.name] for t in manifest.tasks], out / "cache.h5",
                           views=RECIPE["views"], seed=seed, log=quiet)
    return teachers, tasks_path


def _check_teacher_arch(run: Path, arch: str) -> None:
    """A teacher run already in the folder must be of ``arch`` (its config.yaml's model.arch)."""
    config = run / "config.yaml"
    if not config.is_file():
        return
    made = ((load_yaml(config) or {}).get("model") or {}).get("arch", "detr")
    if made != arch:
        raise KacliError(f"holds a {made} teacher; this run trains {arch} teachers (use another folder)", run)


def run_demo(
    out: str | Path,
    minutes: float = DESIGN_MINUTES,
    seed: int = 0,
    force: bool = False,
    train_images: int | None = None,
    val_images: int | None = None,
    log: Callable[[str], None] = print,
    scenario: str = "split",
    test_images: int | None = None,
    arch: str = "conditional",
) -> dict:
    """Run the demo's ``scenario`` (:data:`SCENARIOS`) into ``out``; returns ``{"rows": [...],
    "seconds": total, "stages": {...}, "scenario", "seed", "epochs"}`` (also written as demo.json)."""
    limits.check_minutes("--minutes", minutes)
    limits.check_seed("--seed", seed)
    chosen = get_scenario(scenario)
    check_arch(arch)
    out = Path(out)
    check_output_dir(out, force)
    # --force: the old demo moves aside and comes back if this one fails; it is deleted only when
    # this one is complete (the demo is built in place: its files record their absolute paths).
    aside = out.with_name(f".{out.name}.old")
    if out.exists() and force:
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(out, aside)
    try:
        out.mkdir(parents=True)
        result = _run_demo(out, chosen, minutes, seed, train_images, val_images, test_images, arch)
    except BaseException:
        if aside.exists():
            shutil.rmtree(out, ignore_errors=True)
            os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return result


def _run_demo(out: Path, scenario: Scenario, minutes: float, seed: int, train_images: int | None,
              val_images: int | None, test_images: int | None, arch: str = "detr") -> dict:

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    teacher_epochs = scenario_teacher_epochs(scenario, minutes)
    student_epochs = scaled_epochs(RECIPE["student_epochs"], minutes)
    n_train = train_images or RECIPE["train_images"]
    n_val = val_images or RECIPE["val_images"]
    n_test = RECIPE["test_images"] if test_images is None else test_images

    def stage(name: str):
        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                progress.update(overall, info=name)
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    stages[name] = round(time.perf_counter() - self.t0, 2)
                    progress.update(overall, advance=1)
                return False

        return _Stage()

    runs = out / "runs"
    quiet = lambda msg: None  # noqa: E731  (stages' own chatter would break the one display)
    with shared_progress(unit="stage") as progress:
        overall = progress.add_task("kacli demo", total=6 + len(scenario.runs), info="")
        teachers, tasks_path = prepare_base(out, seed, teacher_epochs, n_train, n_val, stage, scenario, n_test, arch)
        manifest = TaskManifest(tasks_path)
        student_overrides = student_schedule(minutes, seed)
        for name, over in scenario.runs:
            with stage(name):
                amalgamate(out / "cache.h5", tasks_path, out_dir=runs / name,
                           overrides={**student_overrides, **over}, log=quiet)
        with stage("evaluate"):
            (out / "eval").mkdir(exist_ok=True)
            order = [f"teacher-{t.name}" for t in manifest.tasks] + ["ensemble", *scenario.rows]
            results = {}
            for t in manifest.tasks:
                results[f"teacher-{t.name}"] = evaluate_checkpoints([teachers[t.name]], tasks_path, split=REPORT_SPLIT)
            results["ensemble"] = evaluate_checkpoints([teachers[t.name] for t in manifest.tasks], tasks_path,
                                                       split=REPORT_SPLIT)
            for name in scenario.rows:
                results[name] = evaluate_checkpoints([runs / name], tasks_path, split=REPORT_SPLIT)
            for name in order:
                r = results[name]
                r["model"] = name
                if name.startswith("teacher-"):
                    r["train_seconds"] = run_train_seconds(teachers[name[len("teacher-"):]])
                elif name in scenario.rows:
                    r["train_seconds"] = run_train_seconds(runs / name)
                write_json(out / "eval" / f"{name}.json", r)
            rows = load_rows([out / "eval" / f"{name}.json" for name in order])
        curves = load_curves([runs / name for name in scenario.rows])
        write_report(rows, curves, out)
        prediction_pictures(teachers, runs / "student", tasks_path, out / "predictions")
    total = time.perf_counter() - t_start
    summary = {"rows": rows, "seconds": round(total, 1), "stages": stages, "seed": seed, "scenario": scenario.name,
               "arch": arch,
               "epochs": {"teacher": teacher_epochs, "student": student_epochs},
               "split": REPORT_SPLIT, "selection": SELECTION}
    write_json(out / "demo.json", summary)
    return summary


def run_train_seconds(run: Path) -> float | None:
    """The training seconds the last line of ``run``'s metrics.jsonl records (None without one)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return None
    lines = read_jsonl(path)
    return lines[-1][2].get("train_seconds") if lines else None

