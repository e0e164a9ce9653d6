"""``tasks.yaml``: the task manifest every stage after ``split-tasks`` / ``merge-tasks`` names its data by.

Format 1 (``format: kacli-tasks/1``, written by ``split-tasks``; see docs/ARCHITECTURE.md)::

    format: kacli-tasks/1
    scheme: voc-2
    sources: {train: {spec, format, split, path, sha256, image_root}, val: {...}}
    categories: [{id, name, supercategory}, ...]          # all tasks' categories, id order
    tasks: [{name, category_ids, category_names, counts: {train: {images, images_with_objects, annotations}}}]
    splits: {train: {all: train/all.json, tasks: {t1: train/t1.json}, image_root: /abs,
                     dropped: {degenerate, outside_image, unassigned_category}, clipped: n}}

Format 2 (``format: kacli-tasks/2``, written by ``merge-tasks``: tasks from several datasets) is
format 1 with ``sources`` a list ``[{name, task, split, complete_category_ids, images, dataset:
{spec, format, path, split, sha256, image_root}}]`` (each image of a split json carries
``source: <name>`` and is annotated completely for its source's ``complete_category_ids`` only),
``renames: {old: new}``, tasks that may share a category (one student class) and tasks with a
``teacher`` checkpoint and no images (teacher-only). Format 1 reads as one source per split,
complete for every category.

Relative paths are relative to the folder holding tasks.yaml. :class:`TaskManifest` loads and checks
the file; every problem is a :class:`KacliError` naming it. :func:`write_manifest` and
:func:`write_split_json` are the only writers of tasks.yaml and its split files (``split-tasks``,
``merge-tasks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kacli.errors import KacliError
from kacli.fsutil import load_yaml, sha256_file

FORMAT = "kacli-tasks/1"
#: Tasks from several datasets (``merge-tasks``): per-image sources and complete categories.
FORMAT_MERGED = "kacli-tasks/2"
FORMATS = (FORMAT, FORMAT_MERGED)
#: Top-level key of a merged split json: ``{source name: [category ids its images are complete for]}``.
COMPLETE_KEY = "complete_category_ids"
#: The name evaluation gives the row of all sources together; no task of a merged manifest may take it.
UNION = "union"
MANIFEST_NAME = "tasks.yaml"


@dataclass
class TaskInfo:
    """One task: its name, its categories (dataset ids and names, id order) and per-split counts."""

    name: str
    category_ids: list[int]
    category_names: list[str]
    counts: dict = field(default_factory=dict)
    teacher: str | None = None  # teacher-only task (format 2): the checkpoint its categories came from

    def label_map(self) -> dict:
        """``{"ids": [...], "names": [...]}``: class k of a model trained on this task is ids[k]."""
        return {"ids": list(self.category_ids), "names": list(self.category_names)}


def _fail(msg: str, path) -> KacliError:
    return KacliError(f"invalid task manifest: {msg}", path)


def validate_manifest(data, path: str | Path) -> None:
    """Check a tasks.yaml dict's structure; raise a KacliError naming ``path`` on the first problem.

    A category may be in two tasks only in a merged manifest (format 2), where two sources label it
    and it is one student class."""
    if not isinstance(data, dict):
        raise _fail("expected a mapping", path)
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise KacliError(f"not a kacli task manifest: format is {fmt!r}, expected {FORMAT!r} or {FORMAT_MERGED!r}", path)
    merged = fmt == FORMAT_MERGED
    for key, typ in (("categories", list), ("tasks", list), ("splits", dict), ("sources", list if merged else dict)):
        if not isinstance(data.get(key), typ):
            raise _fail(f"{key!r} must be a {typ.__name__}", path)
    cats = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise _fail(f"bad category entry {c!r}", path)
        cats[c["id"]] = c["name"]
    seen: dict[int, str] = {}
    names = []
    for t in data["tasks"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _fail(f"bad task entry {t!r}", path)
        ids, tnames = t.get("category_ids"), t.get("category_names")
        if not isinstance(ids, list) or not isinstance(tnames, list) or len(ids) != len(tnames) or not ids:
            raise _fail(f"task {t['name']!r}: category_ids and category_names must be equal-length non-empty lists", path)
        if len(set(ids)) != len(ids):
            raise _fail(f"task {t['name']!r} lists a category twice", path)
        for i, n in zip(ids, tnames):
            if cats.get(i) != n:
                raise _fail(f"task {t['name']!r}: category {i} {n!r} is not in 'categories'", path)
            if i in seen and not merged:
                raise _fail(f"category {i} is in both tasks {seen[i]!r} and {t['name']!r}", path)
            seen[i] = t["name"]
        if t.get("teacher") is not None and not (merged and isinstance(t["teacher"], str)):
            raise _fail(f"task {t['name']!r}: 'teacher' (a teacher-only task) needs format {FORMAT_MERGED!r} and a path", path)
        names.append(t["name"])
    if not names:
        raise _fail("no tasks", path)
    if len(set(names)) != len(names):
        raise _fail("a task name appears twice", path)
    for split, s in data["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("all"), str) or not isinstance(s.get("image_root"), str):
            raise _fail(f"split {split!r} needs 'all' and 'image_root'", path)
        tasks = s.get("tasks")
        if not isinstance(tasks, dict) or set(tasks) != set(names):
            raise _fail(f"split {split!r} must list a file for every task", path)
    if merged:
        _validate_sources(data, cats, path)


def _validate_sources(data: dict, cats: dict, path) -> None:
    """Format 2's ``sources`` list and ``renames``: each source belongs to an annotated task and a
    split, at most one per (task, split), complete for categories the manifest knows."""
    teacher_only = {t["name"] for t in data["tasks"] if t.get("teacher") is not None}
    tasks = {t["name"] for t in data["tasks"]}
    seen = set()
    for s in data["sources"]:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("name", "task", "split")):
            raise _fail(f"bad source entry {s!r}: needs 'name', 'task' and 'split'", path)
        if s["task"] not in tasks or s["task"] in teacher_only:
            raise _fail(f"source {s['name']!r} belongs to {s['task']!r}, which is not a task with images", path)
        if s["split"] not in data["splits"]:
            raise _fail(f"source {s['name']!r} is in split {s['split']!r}, which 'splits' lacks", path)
        if (s["name"], s["split"]) in seen:
            raise _fail(f"source {s['name']!r} appears twice in split {s['split']!r}", path)
        seen.add((s["name"], s["split"]))
        ids = s.get("complete_category_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and i in cats for i in ids):
            raise _fail(f"source {s['name']!r}: 'complete_category_ids' must list categories of 'categories'", path)
    if not isinstance(data.get("renames", {}), dict):
        raise _fail("'renames' must be a mapping of old name to new name", path)


class TaskManifest:
    """A loaded ``tasks.yaml``.

    Args:
        path: the tasks.yaml file, or the folder holding it.
    """

    def __init__(self, path: str | Path):
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        self.path: Path = p.resolve() if p.exists() else p
        data = load_yaml(self.path)
        validate_manifest(data, self.path)
        self.data: dict = data
        self.dir: Path = self.path.parent
        self.sha256: str = sha256_file(self.path)
        self.tasks: list[TaskInfo] = [
            TaskInfo(t["name"], list(t["category_ids"]), list(t["category_names"]), dict(t.get("counts") or {}),
                     t.get("teacher"))
            for t in data["tasks"]
        ]

    @classmethod
    def load(cls, path: str | Path) -> "TaskManifest":
        return cls(path)

    def __repr__(self) -> str:
        return f"TaskManifest({str(self.path)!r}, tasks={self.task_names})"

    @property
    def scheme(self) -> str:
        return str(self.data.get("scheme", ""))

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskInfo:
        """The task called ``name``; a KacliError naming tasks.yaml if there is none."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KacliError(f"no task {name!r} (tasks: {', '.join(self.task_names)})", self.path)

    @property
    def categories(self) -> list[dict]:
        """All tasks' categories ``{id, name, supercategory}``, id order."""
        return [dict(c) for c in self.data["categories"]]

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.data["categories"]]

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.data["categories"]]

    def student_label_map(self) -> dict:
        """``{"ids", "names"}`` a student detects: every task's categories in task order, a category
        two tasks share (merged manifests) once, where its first task lists it."""
        ids, names = [], []
        for t in self.tasks:
            for i, n in zip(t.category_ids, t.category_names):
                if i not in ids:
                    ids.append(int(i))
                    names.append(n)
        return {"ids": ids, "names": names}

    @property
    def merged(self) -> bool:
        """True for a manifest of tasks from several datasets (``merge-tasks``, format 2)."""
        return self.data["format"] == FORMAT_MERGED

    @property
    def renames(self) -> dict[str, str]:
        """``{old name: new name}`` applied to the sources' and teachers' category names (format 2)."""
        return {str(k): str(v) for k, v in (self.data.get("renames") or {}).items()}

    def require_trainable(self, task: str) -> TaskInfo:
        """The task called ``task``; a KacliError if it is teacher-only (no images to train on)."""
        info = self.task(task)
        if info.teacher is not None:
            raise KacliError(
                f"task {task!r} is teacher-only: it has no annotated images to train on; its teacher is {info.teacher}",
                self.path,
            )
        return info

    def source_records(self) -> list[dict]:
        """Where the images came from: ``[{name, task, split, complete_category_ids, images,
        dataset: {spec, format, path, split, sha256, image_root}}]``. A single-dataset manifest
        (format 1) has one source per split, named after the split, complete for every category."""
        if self.merged:
            return [dict(s) for s in self.data["sources"]]
        return [
            {"name": split, "task": None, "split": split, "complete_category_ids": self.category_ids,
             "dataset": dict(rec) if isinstance(rec, dict) else {}}
            for split, rec in self.data["sources"].items()
        ]

    def task_of(self, category_id: int) -> str:
        """The (first) task holding ``category_id``."""
        for t in self.tasks:
            if category_id in t.category_ids:
                return t.name
        raise KacliError(f"category id {category_id} is in no task", self.path)

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def _split(self, split: str) -> dict:
        s = self.data["splits"].get(split)
        if s is None:
            raise KacliError(f"no split {split!r} (splits: {', '.join(self.splits)})", self.path)
        return s

    def _resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.dir / p

    def split_json(self, split: str, task: str | None = None) -> Path:
        """The COCO json of ``split``: all tasks' categories, or only ``task``'s."""
        s = self._split(split)
        if task is None:
            p = self._resolve(s["all"])
        else:
            self.task(task)
            p = self._resolve(s["tasks"][task])
        if not p.is_file():
            raise KacliError(f"file named by {self.path.name} not found", p)
        return p

    def image_root(self, split: str) -> Path:
        """The folder that ``split``'s ``images[].file_name`` are relative to."""
        p = self._resolve(self._split(split)["image_root"])
        if not p.is_dir():
            raise KacliError(f"image folder of split {split!r} not found (named by {self.path})", p)
        return p

    def box_report(self, split: str) -> dict:
        """``{"dropped": {...}, "clipped": n}`` recorded for ``split``."""
        s = self._split(split)
        return {"dropped": dict(s.get("dropped") or {}), "clipped": int(s.get("clipped") or 0)}


# -- writing ---------------------------------------------------------------------------------------


def write_split_json(path: Path, obj) -> None:
    """One ``<split>/*.json`` of a manifest's folder: compact JSON and a newline (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def write_manifest(folder: Path, manifest: dict, where: str | Path) -> None:
    """``folder/tasks.yaml``, checked first (:func:`validate_manifest`, errors naming ``where``).

    Format 2 keeps each list of ids on one line (flow style, 120 columns); format 1 is written
    in block style, as ``split-tasks`` always wrote it."""
    validate_manifest(manifest, where)
    style = {"default_flow_style": None, "width": 120} if manifest.get("format") == FORMAT_MERGED else {}
    with open(Path(folder) / MANIFEST_NAME, "w", encoding="utf-8") as f:
        yaml.safe_dump(manifest, f, sort_keys=False, allow_unicode=True, **style)
