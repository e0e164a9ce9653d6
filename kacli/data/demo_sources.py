"""The cross-dataset demo's sources: the generated images as if they came from two datasets.

Each split's images are shuffled with the seed and cut into two disjoint halves; the first half
becomes the ``convex`` source, annotated for the convex shapes only, the second the ``concave``
source, annotated for the concave shapes only (the tasks of :func:`kacli.data.demo_data.demo_partition`,
in its order). A source's COCO json lists only its own categories, as a dataset made for those
categories would; the objects of the other task's categories stay in its images, unannotated.
``merge-tasks`` then builds the manifest from these sources as from any two datasets.

Written under ``DIR``: ``<task>-<split>.json`` per task and split (``train``, ``val``, and ``test``
where the generated data has it), ``file_name`` as in the generated ``<split>.json`` (relative to the
generated ``images/`` folder). The
same seed and data give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kacli.data.demo_data import SPLIT_CODES, demo_partition
from kacli.fsutil import atomic_dir, load_json

# Seeds the shuffle apart from the image generator (which uses [seed, split code, image index]).
HALVES_CODE = 7


def split_halves(image_ids: list[int], seed: int, split: str) -> tuple[list[int], list[int]]:
    """``image_ids`` shuffled by ``(seed, split)`` and cut in two: ``(first half, second half)``,
    each sorted; the first has ``len // 2`` ids."""
    ids = np.asarray(sorted(image_ids), dtype=np.int64)
    order = np.random.default_rng([seed, HALVES_CODE, SPLIT_CODES[split]]).permutation(len(ids))
    cut = len(ids) // 2
    return sorted(ids[order[:cut]].tolist()), sorted(ids[order[cut:]].tolist())


def source_subset(coco: dict, image_ids: list[int], category_names: list[str], description: str) -> dict:
    """The COCO dict of ``image_ids`` annotated for ``category_names`` only: those images, their
    annotations of those categories (ids and boxes as in ``coco``), those categories."""
    keep_images = set(image_ids)
    cats = [dict(c) for c in coco["categories"] if c["name"] in category_names]
    keep_cats = {c["id"] for c in cats}
    return {
        "info": {**coco.get("info", {}), "description": description},
        "images": [dict(im) for im in coco["images"] if im["id"] in keep_images],
        "annotations": [dict(a) for a in coco["annotations"]
                        if a["image_id"] in keep_images and a["category_id"] in keep_cats],
        "categories": cats,
    }


def write_demo_sources(data_dir: str | Path, out: str | Path, seed: int, force: bool = False) -> dict[str, dict[str, Path]]:
    """Write the two sources of the generated data in ``data_dir`` (``train.json``, ``val.json``)
    into ``out``; returns ``{task: {split: json path}}``, tasks in the partition's order."""
    data_dir, out = Path(data_dir), Path(out)
    tasks = demo_partition()
    paths: dict[str, dict[str, Path]] = {t: {} for t in tasks}
    with atomic_dir(out, force=force) as tmp:
        for split in ("train", "val", "test"):
            if split == "test" and not (data_dir / "test.json").is_file():
                continue
            coco = load_json(data_dir / f"{split}.json")
            halves = split_halves([im["id"] for im in coco["images"]], seed, split)
            for (task, names), ids in zip(tasks.items(), halves):
                sub = source_subset(coco, ids, names, f"kacli demo shapes, {split} half annotated for {task} only")
                with open(tmp / f"{task}-{split}.json", "w", encoding="utf-8") as f:
                    json.dump(sub, f)
                    f.write("\n")
                paths[task][split] = out / f"{task}-{split}.json"
    return paths


__all__ = ["HALVES_CODE", "source_subset", "split_halves", "write_demo_sources"]
