"""``split_tasks``: a dataset and a scheme → ``tasks.yaml`` plus one COCO json per split and task.

Every task keeps every image; a task's json holds only its categories' annotations and its own
category list; category ids stay the dataset's. ``<split>/all.json`` holds every category that some
task holds (with ``allow_partial``, the unassigned categories' annotations are dropped and counted).
The output folder is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

from kacli.data.coco import annotation_counts, count_summary, subset
from kacli.data.manifest import FORMAT, MANIFEST_NAME, write_manifest, write_split_json
from kacli.data.readers import read_source
from kacli.data.schemes import resolve_scheme, scheme_kind
from kacli.errors import KacliError
from kacli.fsutil import atomic_dir, check_output_dir


def merge_categories(base: list[dict], other: list[dict], other_source: str | Path) -> None:
    """Check that ``other`` (e.g. the validation set's categories) agrees with ``base`` by id and name."""
    by_id = {c["id"]: c for c in base}
    for c in other:
        b = by_id.get(c["id"])
        if b is None:
            raise KacliError(f"category {c['name']!r} (id {c['id']}) is not in the training set's categories", other_source)
        if b["name"] != c["name"]:
            raise KacliError(
                f"category id {c['id']} is {c['name']!r} here but {b['name']!r} in the training set", other_source
            )


def split_tasks(
    train_spec: str | Path,
    val_spec: str | Path | None,
    scheme: str,
    out: str | Path,
    force: bool = False,
    allow_partial: bool = False,
    images: str | Path | None = None,
    test_spec: str | Path | None = None,
) -> dict:
    """Split ``train_spec`` (and ``val_spec``, ``test_spec``) into tasks by ``scheme``; write ``out``.

    Args:
        train_spec, val_spec, test_spec: dataset sources ``PATH[:SPLIT]`` (COCO json, VOC root, YOLO
            root/yaml). Training runs select their checkpoint on val; test is for reported figures.
        scheme: ``voc-2``, ``voc-4``, ``coco-2``, ``balanced:N`` or a partition YAML file.
        out: output folder; must be absent or empty unless ``force``.
        allow_partial: let categories stay outside every task (their annotations are dropped).
        images: image folder for COCO json sources.

    Returns:
        The manifest dict written to ``out/tasks.yaml``.
    """
    out = Path(out)
    check_output_dir(out, force)
    specs = {"train": train_spec} | ({"val": val_spec} if val_spec is not None else {})
    specs |= {"test": test_spec} if test_spec is not None else {}
    data = {split: read_source(spec, images) for split, spec in specs.items()}
    for split, d in data.items():
        if not d["images"]:  # nothing to train or validate on: refuse it here, not at train time
            raise KacliError(f"the {split} source has no images", d["info"]["source"]["path"])
    train = data["train"]
    categories = train["categories"]
    for split, d in data.items():
        if split != "train":
            merge_categories(categories, d["categories"], d["info"]["source"]["path"])

    dataset_path = train["info"]["source"]["path"]
    tasks = resolve_scheme(
        scheme, categories, annotation_counts(train), allow_partial=allow_partial, dataset=dataset_path
    )
    assigned = sorted(i for ids in tasks.values() for i in ids)
    cat_by_id = {c["id"]: c for c in categories}
    all_cats = [cat_by_id[i] for i in assigned]

    manifest: dict = {
        "format": FORMAT,
        "scheme": str(Path(scheme).resolve()) if scheme_kind(scheme) == "file" else scheme,
        "sources": {s: dict(d["info"]["source"]) for s, d in data.items()},
        "categories": [dict(c) for c in all_cats],
        "tasks": [
            {
                "name": name,
                "category_ids": ids,
                "category_names": [cat_by_id[i]["name"] for i in ids],
                "counts": {},
            }
            for name, ids in tasks.items()
        ],
        "splits": {},
    }
    with atomic_dir(out, force=force) as tmp:
        for split, d in data.items():
            src = d["info"]["source"]
            boxes = d["info"]["boxes"]
            everything = subset(d, assigned, categories)
            unassigned = len(d["annotations"]) - len(everything["annotations"])
            everything["info"] = {"description": f"kacli split {split}, all tasks", "source": src, "task": "all"}
            write_split_json(tmp / split / "all.json", everything)
            entry = {
                "all": f"{split}/all.json",
                "tasks": {},
                "image_root": src["image_root"],
                "dropped": {
                    "degenerate": boxes["degenerate"],
                    "outside_image": boxes["outside_image"],
                    "unassigned_category": unassigned,
                },
                "clipped": boxes["clipped"],
            }
            for t in manifest["tasks"]:
                part = subset(d, t["category_ids"], categories)
                part["info"] = {"description": f"kacli split {split}, task {t['name']}", "source": src, "task": t["name"]}
                rel = f"{split}/{t['name']}.json"
                write_split_json(tmp / rel, part)
                entry["tasks"][t["name"]] = rel
                t["counts"][split] = count_summary(part)
            manifest["splits"][split] = entry
        write_manifest(tmp, manifest, out / MANIFEST_NAME)
    return manifest
