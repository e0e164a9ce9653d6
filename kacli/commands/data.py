"""``kacli split-tasks``, ``kacli merge-tasks`` and ``kacli make-demo-data``: the data stage's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    app.command(
        "make-demo-data",
        epilog="Example: kacli make-demo-data --out demo-data --train-images 2000 --val-images 300 --test-images 500 --seed 0",
    )(make_demo_data)
    app.command(
        "split-tasks",
        epilog=(
            "Example: kacli split-tasks --train VOCdevkit/VOC2012:train --val VOCdevkit/VOC2012:val "
            "--test VOCdevkit/VOC2007:test --scheme voc-2 --out tasks"
        ),
    )(split_tasks)
    app.command(
        "merge-tasks",
        epilog=(
            "Example: kacli merge-tasks --task vehicles=vehicles/data.yaml:train --val vehicles=vehicles/data.yaml:val "
            "--task animals=animals/train.json --teacher-only coco=detr-r50.pt --categories coco=person,dog "
            "--out tasks"
        ),
    )(merge_tasks)


@cli_errors
def split_tasks(
    train: str = typer.Option(
        ..., "--train", metavar="SRC", show_default=False,
        help="Training set: COCO json, VOC root or YOLO root/data.yaml, as PATH or PATH:SPLIT.",
    ),
    val: Optional[str] = typer.Option(
        None, "--val", metavar="SRC", show_default=False,
        help="Validation set, written like --train: training runs select their checkpoint on it.",
    ),
    test: Optional[str] = typer.Option(
        None, "--test", metavar="SRC", show_default=False,
        help="Test set, written like --train: for the reported figures (kacli eval --split test); nothing selects on it.",
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="DIR", show_default=False,
        help="Image folder of COCO json sources (default: the json's folder, or its images/).",
    ),
    scheme: str = typer.Option(
        ..., "--scheme", show_default=False,
        help="voc-2, voc-4, coco-2, balanced:N, or a YAML file 'tasks: {name: \\[category names or ids]}'.",
    ),
    out: Path = typer.Option(..., "--out", metavar="DIR", show_default=False, help="Output folder."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Allow categories that no task names (their boxes are dropped)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a table."),
):  # fmt: skip
    """Split a detection dataset into tasks, one per teacher.

    Writes DIR/tasks.yaml and DIR/<split>/{all,<task>}.json; every task keeps every image and only
    its own categories' boxes. Category ids stay the dataset's."""
    from kacli.data.split import split_tasks as run

    manifest = run(train, val, scheme, out, force=force, allow_partial=allow_partial, images=images, test_spec=test)
    if as_json:
        console.print_json(json.dumps(manifest))
        return
    console.print(split_table(manifest))
    for split, s in manifest["splits"].items():
        d = s["dropped"]
        console.print(
            f"{split}: dropped {d['degenerate']} degenerate, {d['outside_image']} outside the image, "
            f"{d['unassigned_category']} of unassigned categories; clipped {s['clipped']} to the image",
            highlight=False,
        )
    console.print(f"wrote {Path(out) / 'tasks.yaml'}", highlight=False)


def split_table(manifest: dict) -> Table:
    """Task × (categories, per split: images with objects, annotations)."""
    splits = list(manifest["splits"])
    table = Table(title=f"tasks ({manifest['scheme']})")
    table.add_column("task", style="bold")
    table.add_column("categories")
    for s in splits:
        table.add_column(f"{s} images w/ obj.", justify="right")
        table.add_column(f"{s} anns", justify="right")
    for t in manifest["tasks"]:
        row = [t["name"], ", ".join(t["category_names"])]
        for s in splits:
            c = t["counts"][s]
            row += [f"{c['images_with_objects']} / {c['images']}", str(c["annotations"])]
        table.add_row(*row)
    return table


@cli_errors
def merge_tasks(
    task: Optional[List[str]] = typer.Option(
        None, "--task", metavar="NAME=SRC", show_default=False,
        help="A task and its training set (COCO json, VOC root or YOLO root/data.yaml, PATH or PATH:SPLIT). Repeat.",
    ),
    val: Optional[List[str]] = typer.Option(
        None, "--val", metavar="NAME=SRC", show_default=False,
        help="A task's validation set, written like --task: training runs select their checkpoint on it.",
    ),
    images: Optional[List[str]] = typer.Option(
        None, "--images", metavar="NAME=DIR", show_default=False, help="Image folder of a task's COCO json training set."
    ),
    val_images: Optional[List[str]] = typer.Option(
        None, "--val-images", metavar="NAME=DIR", show_default=False,
        help="Image folder of a task's COCO json validation set.",
    ),
    test: Optional[List[str]] = typer.Option(
        None, "--test", metavar="NAME=SRC", show_default=False,
        help="A task's test set, written like --task: for the reported figures (kacli eval --split test).",
    ),
    test_images: Optional[List[str]] = typer.Option(
        None, "--test-images", metavar="NAME=DIR", show_default=False,
        help="Image folder of a task's COCO json test set.",
    ),
    categories: Optional[List[str]] = typer.Option(
        None, "--categories", metavar="NAME=CAT,CAT", show_default=False,
        help="Keep only these categories of a task (default: all its source's or teacher's).",
    ),
    rename: Optional[List[str]] = typer.Option(
        None, "--rename", metavar="OLD=NEW", show_default=False,
        help="Rename a category in every source and teacher before matching names.",
    ),
    teacher_only: Optional[List[str]] = typer.Option(
        None, "--teacher-only", metavar="NAME=CKPT", show_default=False,
        help="A task with no images: its categories are this DETR checkpoint's (e.g. from import-checkpoint).",
    ),
    out: Path = typer.Option(..., "--out", metavar="DIR", show_default=False, help="Output folder."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a table."),
):  # fmt: skip
    """Build tasks from several datasets, one per teacher: each image is annotated for its own source's categories.

    Categories are matched by name (case and spaces ignored, after --rename); one labelled by two
    sources is one class, shared. Writes DIR/tasks.yaml and DIR/<split>/{all,<task>}.json: all.json
    holds every source's images, a task's json its own; the tasks are the --task ones, then the
    --teacher-only ones."""
    from kacli.data.merge import merge_tasks as run
    from kacli.data.merge import renames_from_options, shared_categories, tasks_from_options
    from kacli.teachers.load import teacher_label_map

    tasks = tasks_from_options(task, val, images, val_images, categories, teacher_only, test, test_images)
    manifest = run(tasks, out, renames=renames_from_options(rename), force=force, read_teacher=teacher_label_map)
    shared = shared_categories(manifest)
    if as_json:
        console.print_json(json.dumps(manifest | {"shared": shared}))
        return
    console.print(merge_table(manifest, shared))
    for c in shared:
        console.print(f"shared: {c['name']} (one class, labelled by {', '.join(c['tasks'])})", highlight=False)
    for split, s in manifest["splits"].items():
        d = s["dropped"]
        console.print(
            f"{split}: dropped {d['degenerate']} degenerate, {d['outside_image']} outside the image, "
            f"{d['unassigned_category']} of categories outside their task; clipped {s['clipped']} to the image; "
            f"images under {s['image_root']}",
            highlight=False,
        )
    console.print(f"wrote {Path(out) / 'tasks.yaml'}", highlight=False)


def merge_table(manifest: dict, shared: list[dict]) -> Table:
    """Task × (categories, shared ones starred; per split: images, annotations; where it came from)."""
    splits = list(manifest["splits"])
    both = {c["id"] for c in shared}
    by_task: dict[str, list[str]] = {}
    for s in manifest["sources"]:
        by_task.setdefault(s["task"], []).append(f"{s['split']}: {s['dataset']['spec']}")
    table = Table(title="tasks (* = shared: one class)")
    table.add_column("task", style="bold")
    table.add_column("categories")
    for s in splits:
        table.add_column(f"{s} images, anns", justify="right")
    table.add_column("from")
    for t in manifest["tasks"]:
        cats = ", ".join(n + ("*" if i in both else "") for i, n in zip(t["category_ids"], t["category_names"]))
        counts = [f"{t['counts'][s]['images']}, {t['counts'][s]['annotations']}" for s in splits]
        origin = f"teacher {t['teacher']}" if t.get("teacher") else "\n".join(by_task.get(t["name"], []))
        table.add_row(t["name"], cats, *counts, origin)
    return table


@cli_errors
def make_demo_data(
    out: Path = typer.Option(..., "--out", metavar="DIR", show_default=False, help="Output folder."),
    train_images: int = typer.Option(2000, "--train-images", min=1, help="Training images."),
    val_images: int = typer.Option(300, "--val-images", min=0, help="Validation images (checkpoint selection)."),
    test_images: int = typer.Option(500, "--test-images", min=0, help="Test images (the reported figures)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
    size: int = typer.Option(64, "--size", metavar="PX", help="Image side in pixels."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
):
    """Generate the demo dataset: synthetic shapes of 8 categories in COCO format.

    Writes DIR/images/, DIR/train.json, DIR/val.json, DIR/test.json and the demo's 2-task partition
    DIR/tasks-2.yaml; the same seed gives the same bytes. Training runs select their checkpoint on val;
    report on test, which nothing was selected on."""
    from kacli.data.demo_data import make_demo_data as run

    summary = run(out, train_images=train_images, val_images=val_images, test_images=test_images, seed=seed, size=size, force=force)
    table = Table(title=f"demo data ({summary['seconds']:.1f} s)")
    table.add_column("split", style="bold")
    table.add_column("images", justify="right")
    table.add_column("annotations", justify="right")
    table.add_column("json")
    for split, s in summary["splits"].items():
        table.add_row(split, str(s["images"]), str(s["annotations"]), s["json"])
    console.print(table)
    console.print(f"images under {summary['image_root']}; partition {summary['partition']}", highlight=False)
