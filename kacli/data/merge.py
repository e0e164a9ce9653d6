"""``merge_tasks``: tasks from several datasets → ``tasks.yaml`` (format 2) plus one COCO json per
split and task, laid out as ``split-tasks`` lays them out.

Each task is one training source (and optionally a validation and a test source) read by
:func:`kacli.data.readers.read_source`, holding that source's categories or a named subset, or a
teacher-only task: no images, its categories taken from its teacher's label map. Categories are
matched across tasks by name (:mod:`kacli.data.names`: case- and space-insensitive, after the
rename map); a category two tasks hold is one class, shared by both. Category ids are renumbered
1..K in order of first appearance (task order, then each source's id order).

``<split>/all.json`` holds every source's images (new ids 1..N, ``file_name`` relative to the
deepest folder holding every source's image folder, so equal file names of two sources stay apart)
with ``source`` (its task), ``source_id`` and ``source_file_name`` (the image as its source names
it), and ``complete_category_ids`` ``{source: [ids]}``: an image is annotated completely for its
source's categories only. ``<split>/<task>.json`` holds the task's own images and categories (a
teacher-only task's is empty). The output folder is built under a temporary name and renamed when
complete; bad input writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kacli.data.coco import count_summary
from kacli.data.manifest import (COMPLETE_KEY, FORMAT_MERGED, MANIFEST_NAME, UNION, validate_manifest, write_manifest,
                                 write_split_json)
from kacli.data.names import name_key, rename_keys, renamed
from kacli.data.readers import read_source
from kacli.data.schemes import RESERVED, TASK_NAME
from kacli.errors import KacliError
from kacli.fsutil import atomic_dir, check_output_dir

SCHEME = "merged"
# The splits besides train a task may have: val (checkpoint selection) and test (the reported figures).
EVAL_SPLITS = ("val", "test")
SPLIT_WORDS = {"val": "validation", "test": "test"}


@dataclass
class TaskSource:
    """One task of a merge: a training source (``train``, ``PATH[:SPLIT]``) and optionally a
    validation source (checkpoint selection) and a test source (the reported figures), or a
    ``teacher`` checkpoint and no images; ``categories`` picks a subset by name; ``images`` /
    ``val_images`` / ``test_images`` are the image folders of COCO json sources."""

    name: str
    train: str | None = None
    val: str | None = None
    images: str | None = None
    val_images: str | None = None
    test: str | None = None
    test_images: str | None = None
    categories: list[str] | None = None
    teacher: str | None = None

    @property
    def where(self) -> str | None:
        """The file errors about this task name."""
        return self.teacher or self.train


def _pairs(values, option: str) -> list[tuple[str, str]]:
    out = []
    for v in values or ():
        name, eq, rest = str(v).partition("=")
        if not eq or not name.strip() or not rest.strip():
            raise KacliError(f"{option} {v!r}: expected NAME=VALUE")
        out.append((name.strip(), rest.strip()))
    return out


def tasks_from_options(
    task=(), val=(), images=(), val_images=(), categories=(), teacher_only=(), test=(), test_images=()
) -> list[TaskSource]:
    """The ``merge-tasks`` options (lists of ``NAME=VALUE`` strings) → tasks, ``--task`` ones first,
    then ``--teacher-only`` ones, each in the order given."""
    tasks: list[TaskSource] = []
    by_name: dict[str, TaskSource] = {}
    for option, values, field in (("--task", task, "train"), ("--teacher-only", teacher_only, "teacher")):
        for name, value in _pairs(values, option):
            if name in by_name:
                first = by_name[name]
                raise KacliError(
                    f"two tasks are named {name!r} (also {first.where}); give each task its own name",
                    value,
                )
            t = TaskSource(name, **{field: value})
            by_name[name] = t
            tasks.append(t)
    for option, values, field in (("--val", val, "val"), ("--images", images, "images"),
                                  ("--val-images", val_images, "val_images"), ("--test", test, "test"),
                                  ("--test-images", test_images, "test_images"),
                                  ("--categories", categories, "categories")):
        for name, value in _pairs(values, option):
            t = by_name.get(name)
            if t is None:
                raise KacliError(f"{option} {name}={value}: no task {name!r} (tasks: {', '.join(by_name) or 'none'})")
            if getattr(t, field) is not None:
                raise KacliError(f"{option} names task {name!r} twice")
            if t.teacher is not None and field != "categories":
                raise KacliError(
                    f"task {name!r} is teacher-only (its categories come from this checkpoint) but {option} gives it "
                    f"images ({value}); a teacher-only task has none", t.teacher,
                )
            if field == "categories":
                value = [c.strip() for c in value.split(",") if c.strip()]
            setattr(t, field, value)
    return tasks


def renames_from_options(values) -> dict[str, str]:
    """``["OLD=NEW", ...]`` → ``{OLD: NEW}``; an OLD given twice is an error."""
    out: dict[str, str] = {}
    for old, new in _pairs(values, "--rename"):
        if name_key(old) in {name_key(o) for o in out}:
            raise KacliError(f"--rename renames {old!r} twice")
        out[old] = new
    return out


def _categories(task: TaskSource, cats: list[dict], keys: dict, what: str, where) -> list[dict]:
    """The task's categories from ``cats`` (``{id, name, supercategory}``): renamed, then the subset
    ``task.categories`` names (by new or old name). Each: ``{id (source's), name (new), old, key,
    supercategory}``, source order."""
    out, by_key = [], {}
    for c in cats:
        new = renamed(c["name"], keys)
        k = name_key(new)
        if k in by_key:
            raise KacliError(
                f"categories {by_key[k]['old']!r} and {c['name']!r} of {what} are one name {new!r} after renaming", where
            )
        rec = {"id": int(c["id"]), "name": new, "old": c["name"], "key": k, "supercategory": c.get("supercategory") or ""}
        by_key[k] = rec
        out.append(rec)
    if task.categories is not None:
        picked = []
        for n in task.categories:
            k = name_key(n)
            hit = by_key.get(k) or next((r for r in out if name_key(r["old"]) == k), None)
            if hit is None:
                have = ", ".join(r["name"] for r in out[:12]) + (" ..." if len(out) > 12 else "")
                raise KacliError(f"task {task.name!r} names category {n!r}, which {what} lacks (it has: {have})", where)
            if hit in picked:
                raise KacliError(f"task {task.name!r} names category {n!r} twice", where)
            picked.append(hit)
        out = [r for r in out if r in picked]
    if not out:
        raise KacliError(f"task {task.name!r} is empty: {what} has no categories", where)
    return out


def _read(spec: str, images: str | None, task: str, split: str) -> dict:
    d = read_source(spec, images)
    if not d["images"]:
        raise KacliError(f"task {task!r} is empty: its {split} source has no images", d["info"]["source"]["path"])
    return d


def _check_names(tasks: list[TaskSource]) -> None:
    if not tasks:
        raise KacliError("no tasks: give --task NAME=SOURCE (and --teacher-only NAME=CHECKPOINT)")
    for t in tasks:
        if not TASK_NAME.match(t.name) or t.name in RESERVED or t.name == UNION:
            raise KacliError(f"task name {t.name!r} must be letters, digits, '_', '.', '-' and not 'all' or "
                             f"{UNION!r} (evaluation's row of all sources)", t.where)
    if all(t.teacher is not None for t in tasks):
        raise KacliError("every task is teacher-only: at least one task needs images (--task NAME=SOURCE)", tasks[0].teacher)


#: Reads a teacher-only task's checkpoint: ``path → (file, sha256, label_map)``
#: (:func:`kacli.teachers.load.teacher_label_map`; data/ does not read models).
TeacherReader = Callable[[str], "tuple[Path, str, dict]"]


def merge_tasks(tasks: list[TaskSource], out: str | Path, renames: dict[str, str] | None = None,
                force: bool = False, read_teacher: TeacherReader | None = None) -> dict:
    """Merge ``tasks`` (see :class:`TaskSource`) into one manifest written to ``out``.

    Args:
        tasks: the tasks, in the order the student's classes and the teachers follow.
        out: output folder; must be absent or empty unless ``force``.
        renames: ``{old: new}`` category names (matched case- and space-insensitively) applied to
            every source and teacher; an old name that no source or teacher has is an error.
        read_teacher: reads a teacher-only task's checkpoint (its file, sha256 and label map);
            needed when a task is teacher-only.

    Returns:
        The manifest dict written to ``out/tasks.yaml``.
    """
    out = Path(out)
    check_output_dir(out, force)
    renames = dict(renames or {})
    keys = rename_keys(renames)
    _check_names(tasks)

    # 1. every source and teacher, read and checked before anything is written
    data: dict[str, dict[str, dict]] = {}  # task → split → normalised COCO dict
    teachers: dict[str, tuple[Path, str, dict]] = {}
    for t in tasks:
        if t.teacher is not None:
            if read_teacher is None:
                raise ValueError("merge_tasks needs read_teacher for a teacher-only task")
            teachers[t.name] = read_teacher(t.teacher)
        else:
            data[t.name] = {"train": _read(t.train, t.images, t.name, "train")}
            for split in EVAL_SPLITS:
                if getattr(t, split) is not None:
                    data[t.name][split] = _read(getattr(t, split), getattr(t, f"{split}_images"), t.name, split)
    everywhere = [c["name"] for d in data.values() for s in d.values() for c in s["categories"]]
    everywhere += [n for _, _, lm in teachers.values() for n in lm["names"]]
    known = {name_key(n) for n in everywhere}
    for old, new in renames.items():
        if name_key(old) not in known:
            files = [str(d["train"]["info"]["source"]["path"]) for d in data.values()] + [str(p) for p, _, _ in teachers.values()]
            raise KacliError(f"--rename {old}={new}: no source or teacher has a category {old!r} ({', '.join(files)})")

    # 2. each task's categories, and the union: one class per name
    union: dict[str, dict] = {}  # key → {id, name, supercategory}
    task_cats: dict[str, list[dict]] = {}
    for t in tasks:
        if t.teacher is not None:
            path, _, lm = teachers[t.name]
            cats = [{"id": int(i), "name": n} for i, n in zip(lm["ids"], lm["names"])]
            task_cats[t.name] = _categories(t, cats, keys, "the teacher's label map", path)
        else:
            d = data[t.name]["train"]
            task_cats[t.name] = _categories(t, d["categories"], keys, "the source", d["info"]["source"]["path"])
        for c in task_cats[t.name]:
            if c["key"] not in union:
                union[c["key"]] = {"id": len(union) + 1, "name": c["name"], "supercategory": c["supercategory"]}
    for t in tasks:  # each task's categories in class-id order, as split-tasks lists them
        task_cats[t.name].sort(key=lambda c: union[c["key"]]["id"])

    # 3. per split: the sources' images under one root, annotations renumbered
    splits = ["train"] + [s for s in EVAL_SPLITS if any(s in d for d in data.values())]
    manifest: dict = {
        "format": FORMAT_MERGED,
        "scheme": SCHEME,
        "renames": renames,
        "sources": [],
        "categories": [dict(c) for c in sorted(union.values(), key=lambda c: c["id"])],
        "tasks": [],
        "splits": {},
    }
    for t in tasks:
        entry = {
            "name": t.name,
            "category_ids": [union[c["key"]]["id"] for c in task_cats[t.name]],
            "category_names": [union[c["key"]]["name"] for c in task_cats[t.name]],
            "counts": {},
        }
        if t.teacher is not None:
            entry["teacher"] = str(teachers[t.name][0])
            entry["teacher_sha256"] = teachers[t.name][1]
        manifest["tasks"].append(entry)
    files: dict[str, dict] = {}
    for split in splits:
        files[split] = _merge_split(split, tasks, data, task_cats, union, manifest)
    validate_manifest(manifest, out / MANIFEST_NAME)
    with atomic_dir(out, force=force) as tmp:
        for split, by_file in files.items():
            for rel, obj in by_file.items():
                write_split_json(tmp / rel, obj)
        write_manifest(tmp, manifest, out / MANIFEST_NAME)
    return manifest


def _val_map(t: TaskSource, train: dict, val: dict, cats: list[dict], keys: dict, split: str) -> dict[int, int | None]:
    """Validation (or test) category id → the train category it is (by name), None when outside the
    task's subset."""
    train_keys = {name_key(renamed(c["name"], keys)) for c in train["categories"]}
    mine = {c["key"]: c["id"] for c in cats}
    out = {}
    for c in val["categories"]:
        k = name_key(renamed(c["name"], keys))
        if k not in train_keys:
            raise KacliError(
                f"category {c['name']!r} of task {t.name!r}'s {SPLIT_WORDS[split]} source is not in its training source",
                val["info"]["source"]["path"],
            )
        out[int(c["id"])] = mine.get(k)
    return out


def _merge_split(split: str, tasks: list[TaskSource], data: dict, task_cats: dict, union: dict, manifest: dict) -> dict:
    """One split's all.json and task jsons (``{relative path: COCO dict}``); adds the split's
    sources, counts and entry to ``manifest``."""
    keys = rename_keys(manifest["renames"])
    present = [t for t in tasks if split in data.get(t.name, {})]
    roots = [Path(data[t.name][split]["info"]["source"]["image_root"]) for t in present]
    common = Path(os.path.commonpath([str(r) for r in roots]))
    images, anns, seen = [], [], {}
    per_task: dict[str, tuple[list, list]] = {t.name: ([], []) for t in tasks}
    complete: dict[str, list[int]] = {}
    dropped = {"degenerate": 0, "outside_image": 0, "unassigned_category": 0}
    clipped = 0
    for t in present:
        d = data[t.name][split]
        src = d["info"]["source"]
        cats = task_cats[t.name]
        if split == "train":
            id_map = {c["id"]: union[c["key"]]["id"] for c in cats}
            ids = [union[c["key"]]["id"] for c in cats]
        else:
            to_train = _val_map(t, data[t.name]["train"], d, cats, keys, split)
            train_uid = {c["id"]: union[c["key"]]["id"] for c in cats}
            id_map = {v: train_uid[tid] for v, tid in to_train.items() if tid is not None}
            ids = sorted(set(id_map.values()))
        complete[t.name] = ids
        new_id = {}
        mine_images, mine_anns = per_task[t.name]
        for im in d["images"]:
            full = os.path.normpath(Path(src["image_root"]) / im["file_name"])
            rel = Path(full).relative_to(common).as_posix()
            if rel in seen:
                other, fn = seen[rel]
                raise KacliError(
                    f"image {im['file_name']!r} of task {t.name!r} is the file {full}, which task {other!r} also holds "
                    f"(as {fn!r}); an image may come from one source only", src["path"],
                )
            seen[rel] = (t.name, im["file_name"])
            rec = {"id": len(images) + 1, "file_name": rel, "width": im["width"], "height": im["height"],
                   "source": t.name, "source_id": im["id"], "source_file_name": im["file_name"]}
            new_id[im["id"]] = rec["id"]
            images.append(rec)
            mine_images.append(rec)
        for a in d["annotations"]:
            uid = id_map.get(a["category_id"])
            if uid is None:
                dropped["unassigned_category"] += 1
                continue
            rec = dict(a, id=len(anns) + 1, image_id=new_id[a["image_id"]], category_id=uid)
            anns.append(rec)
            mine_anns.append(rec)
        boxes = d["info"]["boxes"]
        dropped["degenerate"] += boxes["degenerate"]
        dropped["outside_image"] += boxes["outside_image"]
        clipped += boxes["clipped"]
        manifest["sources"].append({
            "name": t.name, "task": t.name, "split": split, "complete_category_ids": list(ids),
            "images": len(d["images"]),
            "dataset": {k: src[k] for k in ("spec", "format", "path", "split", "sha256", "image_root")},
        })
    files = {
        f"{split}/all.json": {
            "info": {"description": f"kacli merged split {split}, all tasks", "task": "all"},
            "images": images, "annotations": anns, "categories": [dict(c) for c in manifest["categories"]],
            COMPLETE_KEY: complete,
        }
    }
    entry = {"all": f"{split}/all.json", "tasks": {}, "image_root": str(common), "dropped": dropped, "clipped": clipped}
    cat_by_id = {c["id"]: c for c in manifest["categories"]}
    for t, m in zip(tasks, manifest["tasks"]):
        mine_images, mine_anns = per_task[t.name]
        part = {
            "info": {"description": f"kacli merged split {split}, task {t.name}", "task": t.name},
            "images": mine_images, "annotations": mine_anns,
            "categories": [dict(cat_by_id[i]) for i in sorted(m["category_ids"])],
            COMPLETE_KEY: {t.name: list(complete[t.name])} if t.name in complete else {},
        }
        rel = f"{split}/{t.name}.json"
        files[rel] = part
        entry["tasks"][t.name] = rel
        m["counts"][split] = count_summary(part)
    manifest["splits"][split] = entry
    return files


def shared_categories(manifest: dict) -> list[dict]:
    """The categories two or more tasks hold: ``[{id, name, tasks}]``, id order."""
    owners: dict[int, list[str]] = {}
    for t in manifest["tasks"]:
        for i in t["category_ids"]:
            owners.setdefault(i, []).append(t["name"])
    names = {c["id"]: c["name"] for c in manifest["categories"]}
    return [{"id": i, "name": names[i], "tasks": ts} for i, ts in sorted(owners.items()) if len(ts) > 1]


__all__ = ["TaskSource", "tasks_from_options", "renames_from_options", "merge_tasks",
           "shared_categories", "SCHEME"]
