"""``kacli cache-info``: what a teacher cache holds, and a full check of its contents."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kacli.cache import schema
from kacli.data.manifest import TaskManifest
from kacli.errors import KacliError
from kacli.grid import token_grid
from kacli.progress import make_progress
from kacli.teachers.load import teacher_sha256


def cache_summary(path: str | Path) -> dict:
    """Attributes, sizes and token statistics of a cache (complete or ``.partial``).

    Returns ``{"path", "complete", "done_entries", "entries", "images", "views", "seed", "split",
    "tasks_path", "tasks_sha256", "d_model", "enc_layers", "stride", "layers", "dtype", "batch_size",
    "teachers": [{task, checkpoint, sha256, num_classes, num_queries, arch, classifier, kind (kacli | transformers), family,
    teaches (SA+TA | SA (its layers)+TA | TA only), layers (those it holds), sa_off (why a folder
    teaches through TA only, when its sequences do not fit), sequence_bytes (int8: with the scales), head_bytes}],
    "sources": the split's sources from the manifest the cache names ([{name, task, images, format, path,
    complete, complete_all}], complete = the category names its images are annotated for), or None when
    that manifest is unreadable,
    "tokens": {"total", "min", "mean", "max"}, "bytes", "bytes_per_entry", "created", "kacli_version"}``.
    """
    p = Path(path)
    with schema.open_h5(p, "r") as f:
        layout = schema.validate(f, p, require_complete=False)
        a = layout.attrs
        teachers = []
        for k, t in enumerate(a["teachers"]):
            has_seq = schema.has_sequences(t)
            own = schema.teacher_layers(t, layout.layers)  # an RT-DETR hybrid encoder: the last layer
            seq = sum(f[schema.seq_path(k, n)].id.get_storage_size() for n in own)
            if layout.dtype in schema.SCALED and has_seq:
                seq += f[schema.scale_path(k)].id.get_storage_size()
            head = f[f"teachers/{k}/logits"].id.get_storage_size() + f[f"teachers/{k}/boxes"].id.get_storage_size()
            teachers.append(
                {
                    "task": t["task"],
                    "checkpoint": t["checkpoint"],
                    "sha256": t["sha256"],
                    "num_classes": int(t["num_classes"]),
                    "num_queries": int(t["num_queries"]),
                    "arch": str(t.get("arch", "detr")),
                    "classifier": str(t.get("classifier", "softmax")),
                    "kind": str(t.get("kind", "kacli")),
                    "family": t.get("family"),
                    "transformers_version": t.get("transformers_version"),
                    "image_rule": t.get("image_rule"),
                    "teaches": ("TA only" if not has_seq else "SA+TA" if own == list(layout.layers)
                                else f"SA ({', '.join(own)})+TA"),
                    "layers": own,
                    **({"sa_off": t["sa_off"]} if t.get("sa_off") else {}),
                    "sequence_bytes": int(seq),
                    "head_bytes": int(head),
                }
            )
    tokens = layout.hw[:, 0] * layout.hw[:, 1]
    size = p.stat().st_size
    return {
        "path": str(p),
        "format": a["format"],
        "complete": int(a["done_entries"]) == layout.entries,
        "done_entries": int(a["done_entries"]),
        "entries": layout.entries,
        "images": int(a["images"]),
        "views": int(a["views"]),
        "seed": int(a["seed"]),
        "split": a["split"],
        "tasks_path": a.get("tasks_path"),
        "tasks_sha256": a["tasks_sha256"],
        "d_model": layout.d_model,
        "enc_layers": int(a["enc_layers"]),
        "stride": layout.stride,
        "layers": layout.layers,
        "dtype": layout.dtype,
        "batch_size": int(a.get("batch_size", 0)),
        "teachers": teachers,
        "sources": split_sources(a.get("tasks_path"), a["split"]),
        "tokens": {
            "total": int(tokens.sum()),
            "min": int(tokens.min()) if len(tokens) else 0,
            "mean": float(tokens.mean()) if len(tokens) else 0.0,
            "max": int(tokens.max()) if len(tokens) else 0,
        },
        "bytes": int(size),
        "bytes_per_entry": size / max(layout.entries, 1),
        "created": a.get("created"),
        "kacli_version": a.get("kacli_version"),
    }


def split_sources(tasks_path: str | None, split: str) -> list[dict] | None:
    """Where a split's images came from, read from ``tasks_path`` (None when it is not readable):
    ``[{name, task, images, format, path, complete, complete_all}]``, ``complete`` the names of the
    categories its images are annotated for, ``complete_all`` whether that is every category."""

    try:
        manifest = TaskManifest(tasks_path) if tasks_path else None
    except KacliError:
        return None
    if manifest is None:
        return None
    names = dict(zip(manifest.category_ids, manifest.category_names))
    return [
        {"name": s["name"], "task": s.get("task"), "images": s.get("images"), "format": s["dataset"].get("format"),
         "path": s["dataset"].get("path"), "complete": [names[i] for i in s["complete_category_ids"] if i in names],
         "complete_all": set(s["complete_category_ids"]) >= set(names)}
        for s in manifest.source_records() if s["split"] == split
    ]


def verify_cache(
    path: str | Path, teachers: Sequence[str | Path] = (), progress: bool = True, block_bytes: int = 32 << 20
) -> dict:
    """Check a cache fully: structure (:func:`schema.validate`), the entry tables (image indices in
    range, entry ``e = i·K + v``, token grids equal ``ceil(view size / stride)``), every stored
    value finite, boxes in [0, 1] and logits within float16's range, int8 values in ``[-127, 127]``
    with finite scales ``>= 0``, at most :data:`schema.MAX_INT8_SCALE` and zero only beside zeros
    (each named with its teacher and layer), and the teachers' sha256 against the given checkpoint
    files (in order).

    Returns ``{"ok": bool, "problems": [str], "values_checked": int}``; a file that is not a
    readable complete cache raises KacliError.
    """

    p = Path(path)
    problems: list[str] = []
    checked = 0
    with schema.open_h5(p, "r") as f:
        layout = schema.validate(f, p, require_complete=True)
        a = layout.attrs
        E, K = layout.entries, int(a["views"])
        image_index = f["entries/image_index"][...]
        view_index = f["entries/view_index"][...]
        view = f["entries/view"][...]
        e = np.arange(E)
        if E != int(a["images"]) * K:
            problems.append(f"entries {E} != images {a['images']} × views {K}")
        if not np.array_equal(image_index, e // K) or not np.array_equal(view_index, e % K):
            problems.append("entry tables do not follow e = image·K + view")
        grid = np.stack(token_grid(view[:, 5].astype(np.int64), view[:, 6].astype(np.int64), layout.stride), 1
                        ) if E else np.zeros((0, 2), np.int64)
        if not np.array_equal(grid, layout.hw):
            bad = int(np.nonzero((grid != layout.hw).any(1))[0][0])
            problems.append(f"entry {bad}: token grid {layout.hw[bad].tolist()} is not ceil(view size / stride) {grid[bad].tolist()}")
        if not np.isfinite(view).all():
            problems.append("non-finite view parameters")

        held = {k: schema.teacher_layers(layout.teachers[k], layout.layers) for k in layout.seq_teachers}
        names = [schema.seq_path(k, n) for k in layout.seq_teachers for n in held[k]]
        names += [f"teachers/{k}/{x}" for k in range(layout.num_teachers) for x in ("logits", "boxes")]
        if layout.dtype in schema.SCALED:
            names += [schema.scale_path(k) for k in layout.seq_teachers]
        total = sum(int(np.prod(f[n].shape)) for n in names)
        scaled = layout.dtype in schema.SCALED
        # an int8 sequence is read with its layer's column of scales: (teacher, column) by dataset
        columns = {schema.seq_path(k, n): (k, j) for k in layout.seq_teachers for j, n in enumerate(held[k])}
        with make_progress("value", disable=not progress, transient=True) as bar:
            task = bar.add_task("verify", total=total, info="")
            for n in names:
                ds = f[n]
                row = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
                step = max(1, block_bytes // max(row, 1))
                bad = out_of_range = 0
                scale_counts = np.zeros(3, np.int64)
                for s in range(0, ds.shape[0], step):
                    block = ds[s : s + step]
                    bad += int(block.size - np.count_nonzero(np.isfinite(block)))
                    out_of_range += _out_of_range(n, block)
                    if scaled and n in columns:
                        k, j = columns[n]
                        scale_counts += _bad_scales(block, f[schema.scale_path(k)][s : s + step, j])
                    checked += block.size
                    bar.update(task, advance=block.size)
                if bad:
                    problems.append(f"/{n} holds {bad} non-finite values")
                if out_of_range:
                    what = ("int8 values of -128 (outside [-127, 127])" if ds.dtype == np.int8 else
                            "boxes outside [0, 1]" if n.endswith("/boxes") else "logits beyond ±65504")
                    problems.append(f"{_teacher(a, n)}: /{n} holds {out_of_range} {what}")
                for count, what in zip(scale_counts.tolist(), _SCALE_PROBLEMS):
                    if count:
                        k, j = columns[n]
                        problems.append(f"{_teacher(a, n)}, layer {held[k][j]}: /{schema.scale_path(k)} holds "
                                        f"{count} {what}")
    stored = a["teachers"]
    if teachers:
        if len(teachers) != len(stored):
            problems.append(f"{len(teachers)} teacher files given, the cache was made from {len(stored)}")
        for k, (given, t) in enumerate(zip(teachers, stored)):
            sha = teacher_sha256(given)
            if sha != t["sha256"]:
                problems.append(f"teacher {k + 1} ({Path(given).name}) is not the checkpoint the cache was made from ({t['checkpoint']})")
    return {"ok": not problems, "problems": problems, "values_checked": checked}


def _out_of_range(name: str, block: np.ndarray) -> int:
    """Values no cache holds: -128 in an int8 sequence, boxes outside [0, 1], logits beyond
    float16's range (:func:`schema.head_out_of_range`)."""
    if block.dtype == np.int8:
        return int(np.count_nonzero(block == -128))
    for what in ("boxes", "logits"):
        if name.endswith("/" + what):
            return schema.head_out_of_range(what, block)
    return 0


_SCALE_PROBLEMS = (
    "negative scales",
    "zero scales on tokens whose int8 values are not zero (they would read back as zeros)",
    f"scales above {schema.MAX_INT8_SCALE:.1f} (values beyond float16's range, which no teacher writes)",
)


def _bad_scales(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The int8 scales of a block of tokens (``q`` (n, d), ``scale`` (n,)) that no writer stores:
    counts of (negative, zero beside non-zero values, above :data:`schema.MAX_INT8_SCALE`)."""
    s = scale.astype(np.float64)
    nonzero = (q != 0).any(axis=1) if q.size else np.zeros(len(s), bool)
    return np.array([np.count_nonzero(s < 0), np.count_nonzero((s == 0) & nonzero),
                     np.count_nonzero(np.isfinite(s) & (s > schema.MAX_INT8_SCALE))], np.int64)


def _teacher(attrs: dict, name: str) -> str:
    """``teacher <k> (<task>)`` for a dataset ``teachers/<k>/...``."""
    k = int(name.split("/")[1])
    return f"teacher {k} ({attrs['teachers'][k]['task']})"


def require_verified(path: str | Path, result: dict) -> None:
    """Raise a one-line KacliError if :func:`verify_cache` found problems."""
    if not result["ok"]:
        more = f" (and {len(result['problems']) - 1} more)" if len(result["problems"]) > 1 else ""
        raise KacliError(f"verification failed: {result['problems'][0]}{more}", path)
