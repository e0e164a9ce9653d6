"""Task partitions: which categories each teacher's task holds.

A scheme is one of

- ``voc-2``, ``voc-4``: the paper's Table II, by VOC class name (:data:`PRESETS`);
- ``coco-2``: the paper's Table III, by COCO category id;
- ``balanced:N``: N parts whose sizes differ by at most one category. When the dataset has COCO
  supercategories (some shared by several categories), each supercategory's members are dealt
  round-robin across the parts; otherwise categories go, most annotated first, to the part with the
  fewest annotations that still has room. Deterministic either way;
- a YAML file ``tasks: {name: [category names or ids], ...}``.

:func:`resolve_scheme` returns ``{task name: [category ids sorted]}`` in task order, after checking
that tasks are non-empty and disjoint, name only known categories, and (unless ``allow_partial``)
cover every category.
"""

from __future__ import annotations

import re
from pathlib import Path

from kacli.errors import KacliError
from kacli.fsutil import load_yaml

_VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow "
    "diningtable dog horse motorbike person pottedplant sheep sofa train tvmonitor"
).split()

PRESETS: dict[str, dict[str, list]] = {
    "voc-2": {"t1": _VOC[:10], "t2": _VOC[10:]},
    "voc-4": {"t1": _VOC[:5], "t2": _VOC[5:10], "t3": _VOC[10:15], "t4": _VOC[15:]},
    "coco-2": {
        "t1": [1, 2, 3, 4, 5, 10, 11, 16, 17, 18, 19, 20, 27, 28, 31, 34, 35, 36, 37, 38,
               44, 46, 47, 52, 53, 54, 55, 56, 62, 63, 64, 72, 73, 74, 78, 79, 80, 84, 85, 86],
        "t2": [6, 7, 8, 9, 13, 14, 15, 21, 22, 23, 24, 25, 32, 33, 39, 40, 41, 42, 43, 48,
               49, 50, 51, 57, 58, 59, 60, 61, 65, 67, 70, 75, 76, 77, 81, 82, 87, 88, 89, 90],
    },
}  # fmt: skip

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED = {"all"}


def scheme_kind(scheme: str) -> str:
    """``preset``, ``balanced`` or ``file``."""
    if scheme in PRESETS:
        return "preset"
    if scheme.startswith("balanced:"):
        return "balanced"
    return "file"


def parse_balanced(scheme: str, source: str | Path | None = None) -> int:
    """``balanced:N`` → N (errors name ``source``)."""
    try:
        n = int(scheme.split(":", 1)[1])
    except ValueError:
        raise KacliError(f"scheme {scheme!r}: expected balanced:N with N a whole number", source) from None
    if n < 1:
        raise KacliError(f"scheme {scheme!r}: N must be at least 1 (the partition would be empty)", source)
    return n


def has_supercategories(categories: list[dict]) -> bool:
    """True when every category has a supercategory and some supercategory holds several."""
    scs = [c.get("supercategory") or "" for c in categories]
    return all(s and s != "none" for s in scs) and len(set(scs)) < len(scs)


def balanced_partition(categories: list[dict], n: int, ann_counts: dict[int, int] | None = None) -> dict[str, list[int]]:
    """``balanced:N`` → ``{"t1": [...], ..., "tN": [...]}`` (see the module docstring)."""
    k = len(categories)
    counts = ann_counts or {}
    cap = [k // n + (1 if i < k % n else 0) for i in range(n)]
    parts: list[list[int]] = [[] for _ in range(n)]
    if has_supercategories(categories):
        groups: dict[str, list[dict]] = {}
        for c in categories:
            groups.setdefault(c["supercategory"], []).append(c)
        order = []
        for sc in sorted(groups):
            order.extend(sorted(groups[sc], key=lambda c: (-counts.get(c["id"], 0), c["id"])))
        for i, c in enumerate(order):
            parts[i % n].append(c["id"])
    else:
        load = [0] * n
        for c in sorted(categories, key=lambda c: (-counts.get(c["id"], 0), c["id"])):
            j = min((p for p in range(n) if len(parts[p]) < cap[p]), key=lambda p: (load[p], len(parts[p]), p))
            parts[j].append(c["id"])
            load[j] += counts.get(c["id"], 0)
    return {f"t{i + 1}": sorted(p) for i, p in enumerate(parts)}


def load_partition_file(path: str | Path) -> dict[str, list]:
    """A partition YAML → ``{task name: [names or ids]}`` as written (structure checked)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or "tasks" not in data:
        raise KacliError("not a partition file: expected 'tasks: {name: [categories]}'", path)
    unknown = sorted(set(data) - {"tasks"})
    if unknown:
        raise KacliError(f"unknown key(s) {', '.join(map(repr, unknown))}; a partition file has only 'tasks'", path)
    tasks = data["tasks"]
    if tasks is None or tasks == {}:
        raise KacliError("the partition is empty: 'tasks' names no task", path)
    if not isinstance(tasks, dict):
        raise KacliError("'tasks' must be a mapping of task name to a list of categories", path)
    out = {}
    for name, cats in tasks.items():
        if cats is None:
            cats = []
        if not isinstance(cats, list):
            raise KacliError(f"task {name!r}: expected a list of category names or ids", path)
        for c in cats:
            if isinstance(c, bool) or not isinstance(c, (int, str)):
                raise KacliError(f"task {name!r}: {c!r} is not a category name or id", path)
        out[str(name)] = cats
    return out


def check_partition(
    tasks: dict[str, list],
    categories: list[dict],
    source: str | Path | None,
    label: str,
    allow_partial: bool = False,
) -> dict[str, list[int]]:
    """Map names/ids to category ids and check the partition.

    Errors (each names ``source``): no task; a bad or reserved task name; an empty task; an unknown
    category; a category in two tasks (or twice in one); categories left unassigned (unless
    ``allow_partial``).
    """
    if not tasks:
        raise KacliError(f"{label}: the partition is empty", source)
    by_id = {c["id"]: c for c in categories}
    by_name = {c["name"]: c for c in categories}
    owner: dict[int, str] = {}
    out: dict[str, list[int]] = {}
    for name, cats in tasks.items():
        if not TASK_NAME.match(name) or name in RESERVED:
            raise KacliError(
                f"{label}: task name {name!r} must be letters, digits, '_', '.', '-' and not 'all'", source
            )
        if not cats:
            raise KacliError(f"{label}: task {name!r} is empty", source)
        ids = []
        for c in cats:
            cat = by_id.get(c) if isinstance(c, int) else by_name.get(c)
            if cat is None:
                kind = "id" if isinstance(c, int) else "name"
                raise KacliError(f"{label}: task {name!r} names unknown category {kind} {c!r}", source)
            cid = cat["id"]
            if cid in owner:
                where = "twice in task" if owner[cid] == name else f"in both tasks {owner[cid]!r} and"
                raise KacliError(f"{label}: category {cat['name']!r} (id {cid}) is {where} {name!r}", source)
            owner[cid] = name
            ids.append(cid)
        out[name] = sorted(ids)
    left = [c for c in categories if c["id"] not in owner]
    if left and not allow_partial:
        names = ", ".join(f"{c['name']!r}" for c in left[:5]) + (" ..." if len(left) > 5 else "")
        raise KacliError(
            f"{label}: {len(left)} categories are in no task ({names}); assign them or pass --allow-partial", source
        )
    return out


def resolve_scheme(
    scheme: str,
    categories: list[dict],
    ann_counts: dict[int, int] | None = None,
    *,
    allow_partial: bool = False,
    dataset: str | Path | None = None,
) -> dict[str, list[int]]:
    """Turn a scheme string into ``{task: [category ids]}`` for this dataset's categories.

    Args:
        scheme: ``voc-2``, ``voc-4``, ``coco-2``, ``balanced:N`` or a partition YAML path.
        categories: the dataset's categories (``id``, ``name``, ``supercategory``).
        ann_counts: annotations per category id (for ``balanced:N`` without supercategories).
        allow_partial: allow categories that no task names.
        dataset: the dataset's path, named in errors about a preset that does not fit it.
    """
    kind = scheme_kind(scheme)
    if kind == "preset":
        return check_partition(PRESETS[scheme], categories, dataset, f"scheme {scheme}", allow_partial)
    if kind == "balanced":
        n = parse_balanced(scheme, dataset)
        if n > len(categories):
            raise KacliError(
                f"scheme {scheme}: {n} parts but only {len(categories)} categories (a part would be empty)", dataset
            )
        return check_partition(balanced_partition(categories, n, ann_counts), categories, dataset, f"scheme {scheme}")
    path = Path(scheme)
    if not path.exists():
        raise KacliError("scheme is not voc-2, voc-4, coco-2, balanced:N, nor an existing partition YAML file", path)
    return check_partition(load_partition_file(path), categories, path, "partition", allow_partial)
