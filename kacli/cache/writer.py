"""``kacli cache-teachers``: run the teachers once over every view of a split and store what the
student needs from them (schema: docs/CACHE.md, :mod:`kacli.cache.schema`).

The work is planned before anything runs (:mod:`kacli.cache.plan`): every entry's view, and so its
token count, is a pure function of ``(seed, image, view)``, which gives the file's exact size up
front (printed, and checked against the free disk) and lets the datasets be preallocated. Teachers
(:mod:`kacli.teachers`, :mod:`kacli.cache.extract`) then run in fixed batches of consecutive entries ``[b·B, (b+1)·B)``,
images decoded by DataLoader workers, while a background thread writes the previous batch
(:mod:`kacli.cache.output`). The file is written as ``<out>.partial`` with a ``done_entries``
attribute advanced after every flushed batch; a rerun with the same arguments resumes there, and
the finished file is renamed to ``<out>``. Under torchrun each rank writes its share of the
batches to ``<out>.rank<r>.partial`` and rank 0 copies the shards into one file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kacli import __version__
from kacli import runtime
from kacli.cache import schema
from kacli.cache.output import join_shards, normal_attrs, wait_for_shards, write_range
from kacli.cache.plan import CacheJob, plan_entries, shard_plan
from kacli.config import config_to_dict, from_dict
from kacli.data.dataset import CocoDetection
from kacli.data.manifest import TaskManifest
from kacli.data.transforms import AugConfig
from kacli.errors import KacliError
from kacli.fsutil import check_output_file
from kacli.limits import check_seed, check_workers, max_views
from kacli.runconfig import load_run_config
from kacli.teachers.layers import layer_names
from kacli.teachers.load import Teacher, first_kacli_teacher, load_teachers, sequence_teachers


def resolve_aug(teachers: Sequence[Teacher], config: str | Path | None, log: Callable[[str], None]) -> AugConfig:
    """The views' augmentation: ``--config``'s ``aug`` section if given, else the first teacher's."""
    if config is not None:
        return load_run_config(config, {}).aug
    aug = teachers[0].aug
    if aug is None:
        log(f"{teachers[0].path.name} records no augmentation config: using DETR's (pass --config to choose)")
        return AugConfig()
    return from_dict(aug, AugConfig, teachers[0].path)


# -- the command -----------------------------------------------------------------------------------


def _existing_output(out: Path, attrs: dict, force: bool) -> bool:
    """True when ``out`` is a complete cache with the same content (nothing to do). An existing
    file made otherwise is an error unless ``force``."""
    check_output_file(out, force=True)  # never a symbolic link, device, FIFO or socket, even with --force
    if not out.exists():
        return False
    if out.is_dir():
        raise KacliError("output is a folder, expected a .h5 file path", out)
    try:
        with schema.open_h5(out, "r") as f:
            layout = schema.validate(f, out, require_complete=True)
    except KacliError as e:
        if force:
            return False
        raise KacliError(f"output exists and is not a complete kacli cache ({e.message}); use --force to replace it", out) from None
    have = schema.content_signature(layout.attrs)
    want = schema.content_signature(normal_attrs(attrs))
    key = schema.first_difference(have, want)
    if key is None and not force:
        return True
    if key is not None and not force:
        what = {
            "teacher_sha256": "other teachers",
            "tasks_sha256": "another tasks.yaml",
            "teacher_runtime": "another transformers version",
            "split": f"split {have['split']!r}",
        }.get(key, f"other settings ({key}: {json.dumps(have[key])[:60]} there, {json.dumps(want[key])[:60]} here)")
        raise KacliError(f"output exists and was made for {what}; use --force to replace it", out)
    return False


def _nearest_folder(folder: Path) -> Path:
    """``folder``, or its closest existing ancestor (where it would be created)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_disk(folder: Path, need: int, what: str, partial: Path | None = None) -> int:
    """Refuse to start when ``folder`` has less free disk than ``need`` (less what ``partial``, a
    file being resumed, already holds), saying how to go on."""
    free = shutil.disk_usage(folder).free
    have = partial.stat().st_size if partial is not None and partial.is_file() else 0
    if need - have > free:
        hint = (f"; {partial.name} holds the entries done so far: make room, or delete it to start over"
                if have else "")
        raise KacliError(
            f"not enough free disk for {what}: needs about {schema.human_bytes(need - have)} more, "
            f"{schema.human_bytes(free)} free{hint}",
            folder,
        )
    return free


def cache_teachers(
    tasks: str | Path,
    teachers: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "train",
    views: int = 1,
    layers: str | Sequence[str] = "all",
    dtype: str = "float16",
    batch_size: int = 8,
    device: str = "auto",
    workers: int = 2,
    seed: int = 0,
    config: str | Path | None = None,
    force: bool = False,
    estimate_only: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    ta_only: Sequence[str] = (),
) -> dict:
    """Run the teachers over ``views`` views of every image of ``split`` and write ``out`` (HDF5).
    ``ta_only``: tasks whose transformers-folder teacher teaches through TA only (no sequences cached).

    Returns a summary: ``{"out", "status" ("written" | "up to date"), "entries", "images", "views",
    "tokens", "layers", "teachers", "dtype", "estimated_bytes", "bytes", "seconds", "entries_per_s",
    "resumed_from"}``. With ``estimate_only`` nothing runs and nothing is written: the summary has
    ``status`` "estimate", ``estimates`` ({dtype: bytes} for every storage scheme) and
    ``free_bytes`` (free disk where ``out`` would go), and ``bytes`` None.
    """
    if views < 1:
        raise KacliError(f"--views must be at least 1, got {views}")

    if views > max_views():
        raise KacliError(f"--views {views} is over the limit of {max_views()} views per image "
                         "(set KACLI_MAX_VIEWS to raise it)")
    if batch_size < 1:
        raise KacliError(f"--batch-size must be at least 1, got {batch_size}")
    check_workers("--workers", workers)
    check_seed("--seed", seed)
    if dtype not in schema.DTYPES:
        raise KacliError(f"--dtype must be one of {', '.join(schema.DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.is_dir():
        raise KacliError("output is a folder, expected a .h5 file path", out)
    manifest = TaskManifest(tasks)
    json_path = manifest.split_json(split)
    image_root = manifest.image_root(split)
    loaded = load_teachers(manifest, teachers, ta_only)
    first = first_kacli_teacher(loaded)  # the settings and views; width, depth and stride are every SA teacher's
    aug = resolve_aug([first], config, log)
    layer_list = layer_names(layers, first.enc_layers)
    for t in loaded:
        if t.sequences and not t.gives(layer_list):  # an RT-DETR hybrid encoder gives the last layer only
            t.teach_ta_only(f"teaches through TA only: it gives {', '.join(t.layer_set or [])}, none of the layers "
                            f"cached ({', '.join(layer_list)})")
    union = manifest.student_label_map()  # a category two tasks share is one class

    dist = runtime.init_distributed(device)
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
        progress = False
    for t in loaded:
        if t.sa_note:
            log(f"{t.path.name}: {t.sa_note}")

    base = CocoDetection(json_path, image_root, union["ids"], train=False, aug=aug)
    if base.num_images == 0:
        raise KacliError(f"split {split!r} has no images", json_path)
    plan = plan_entries(base, aug, views, seed, first.stride)
    E = plan.entries
    tokens = plan.tokens
    attrs = {
        "format": schema.FORMAT,
        "kacli_version": __version__,
        "split": split,
        "tasks_path": str(manifest.path),
        "tasks_sha256": manifest.sha256,
        "teachers": [t.describe() for t in loaded],
        "label_map": union,
        "d_model": first.d_model,
        "enc_layers": first.enc_layers,
        "stride": first.stride,
        "layers": layer_list,
        "dtype": dtype,
        "views": int(views),
        "seed": int(seed),
        "aug": config_to_dict(aug),
        "teacher_settings": first.recorded_settings(),
        "view_policy": schema.VIEW_POLICY,
        "batch_size": int(batch_size),
        "entries": int(E),
        "images": int(plan.images),
        "total_tokens": int(tokens.sum()),
    }
    heads = [(t.num_queries, t.num_classes) for t in loaded]
    n_seq = len(sequence_teachers(loaded))
    pairs = sum(len(t.gives(layer_list)) for t in loaded)  # the (teacher, layer) sequences stored
    estimate = schema.estimate_bytes(int(tokens.sum()), E, first.d_model, len(layer_list), heads, dtype, n_seq, pairs)
    summary = {
        "out": str(out),
        "entries": E,
        "images": plan.images,
        "views": views,
        "tokens": int(tokens.sum()),
        "layers": layer_list,
        "teachers": [t.describe() for t in loaded],
        "dtype": dtype,
        "estimated_bytes": estimate,
        "resumed_from": None,
    }
    if estimate_only:
        estimates = schema.size_estimates(int(tokens.sum()), E, first.d_model, len(layer_list), heads, n_seq, pairs)
        free = shutil.disk_usage(_nearest_folder(out.parent)).free
        return summary | {"status": "estimate", "estimates": estimates, "free_bytes": free, "bytes": None,
                          "seconds": 0.0, "entries_per_s": None}
    if _existing_output(out, attrs, force):
        log(f"{out} is up to date (same teachers, tasks.yaml, views, layers, dtype and batch size)")
        return summary | {"status": "up to date", "bytes": out.stat().st_size, "seconds": 0.0, "entries_per_s": None}

    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    log(
        f"caching {E} entries ({plan.images} images × {views} views, {int(tokens.sum())} tokens) from "
        f"{len(loaded)} teachers × {len(layer_list)} layers ({', '.join(layer_list)}), {dtype}: "
        f"estimated {schema.human_bytes(estimate)} ({schema.human_bytes(estimate / E)} per entry), "
        f"{schema.human_bytes(free)} free"
    )
    chunk = schema.chunk_rows(tokens, first.d_model, np.dtype(schema.DTYPES[dtype]).itemsize)
    partial = Path(f"{out}.partial")
    dataset = CocoDetection(json_path, image_root, union["ids"], train=False, aug=aug, views=plan.view_list())
    job = CacheJob(plan=plan, teachers=loaded, layers=layer_list, dtype=dtype, batch_size=batch_size, chunk=chunk,
                   dataset=dataset, device=dist.device, workers=workers, log=log, progress=progress)
    num_batches = -(-E // batch_size)
    t0 = time.perf_counter()

    if not dist.distributed:
        _check_disk(out.parent, estimate, "the cache", partial)
        res = write_range(job, partial, attrs, 0, E, "cache-teachers")
        os.replace(partial, out)
        summary["resumed_from"] = res["resumed_from"]
    else:
        W, r = dist.world_size, dist.rank
        shards = shard_plan(attrs, tokens, num_batches, batch_size, W, Path(out))
        mine = [sh for sh in shards if sh["rank"] == r]
        if mine:
            sh = mine[0]
            start, end = sh["attrs"]["shard"]["start"], sh["attrs"]["shard"]["end"]
            share = schema.estimate_bytes(int(tokens[start:end].sum()), end - start, first.d_model, len(layer_list), heads,
                                          dtype, n_seq, pairs)
            _check_disk(out.parent, share + (estimate if dist.is_main else 0), f"rank {r}'s shard")
            res = write_range(job, sh["path"], sh["attrs"], start, end, f"cache-teachers rank {r}")
            summary["resumed_from"] = res["resumed_from"]
        if not dist.is_main:
            return summary | {"status": f"wrote shard {r}", "bytes": None, "seconds": time.perf_counter() - t0,
                              "entries_per_s": None}
        wait_for_shards(shards, log)
        log(f"joining {len(shards)} shards into {out.name}")
        join_shards(job, partial, shards, attrs)
        os.replace(partial, out)
        for sh in shards:
            sh["path"].unlink(missing_ok=True)

    seconds = time.perf_counter() - t0
    summary.update(
        status="written",
        bytes=out.stat().st_size if out.exists() else None,
        seconds=seconds,
        entries_per_s=E / seconds if seconds > 0 else None,
    )
    return summary


__all__ = ["cache_teachers", "resolve_aug"]
