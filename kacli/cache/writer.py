"""``kacli cache-teachers``: run the teachers once over every view of a split and store what the
student needs from them (schema: docs/CACHE.md, :mod:`kacli.cache.schema`).

The work is planned before anything runs: every entry's view, and so its token count, is a pure
function of ``(seed, image, view)``, which gives the file's exact size up front (printed, and
checked against the free disk) and lets the datasets be preallocated. Teachers then run in fixed
batches of consecutive entries ``[b·B, (b+1)·B)``, images decoded by DataLoader workers, while a
background thread writes the previous batch. The file is written as ``<out>.partial`` with a
``done_entries`` attribute advanced after every flushed batch; a rerun with the same arguments
resumes there, and the finished file is renamed to ``<out>``. Under torchrun each rank writes its
share of the batches to ``<out>.rank<r>.partial`` and rank 0 copies the shards into one file.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from kacli import __version__
from kacli.cache import schema
from kacli.cache.labels import match_classes, remap_logits
from kacli.cache.quant import quantize_int8
from kacli.config import config_to_dict, from_dict
from kacli.data.dataset import CocoDetection, collate, item_seed
from kacli.data.manifest import TaskManifest
from kacli.data.transforms import VIEW_LEN, AugConfig, View, eval_view, sample_train_view
from kacli.engine import distributed
from kacli.engine.runconfig import recorded_settings
from kacli.errors import KacliError
from kacli.models.checkpoint import build_model, load_checkpoint, resolve_checkpoint_path
from kacli.progress import make_progress

#: Test hook: the writer SIGKILLs its own process after writing this many batches.
KILL_ENV = "KACLI_TEST_KILL_AFTER_BATCHES"

#: Attributes that may differ between two runs that produce the same cache.
VOLATILE_ATTRS = ("created", "done_entries")


# -- teachers ----------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A loaded teacher: its checkpoint file, sha256, task, label map and model (eval mode, CPU)."""

    path: Path
    sha256: str
    task: str
    label_map: dict
    model: torch.nn.Module
    config: dict
    class_map: list[int] | None = None  # teacher class of each task class (labels.match_classes); None: the same

    @property
    def num_classes(self) -> int:
        return len(self.label_map["ids"])

    @property
    def num_queries(self) -> int:
        return int(self.model.cfg.num_queries)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def enc_layers(self) -> int:
        return int(self.model.cfg.enc_layers)

    @property
    def stride(self) -> int:
        return int(self.model.backbone.stride)

    def describe(self) -> dict:
        return {
            "task": self.task,
            "checkpoint": str(self.path),
            "sha256": self.sha256,
            "label_map": {"ids": [int(i) for i in self.label_map["ids"]], "names": list(self.label_map["names"])},
            "num_classes": self.num_classes,
            "num_queries": self.num_queries,
        } | ({"class_map": list(self.class_map)} if self.class_map is not None else {})


def load_teachers(manifest: TaskManifest, paths: Sequence[str | Path]) -> list[Teacher]:
    """Load one teacher per task, in the manifest's task order, and check that they fit.

    A teacher's classes are matched to its task's by name (:func:`kacli.cache.labels.match_classes`,
    after the manifest's renames); a teacher whose label map is not its task's (a COCO DETR for a
    few of COCO's categories) gets a ``class_map`` and its logits are stored in the task's class
    order, its other classes folded into no-object (:func:`kacli.cache.labels.remap_logits`).

    Raises KacliError (naming the teacher file) when the count is wrong, a label map lacks one of
    its task's categories (naming the task it does fit, if any: teachers given in the wrong order), or
    a teacher's d_model, encoder depth or backbone stride differs from the first teacher's.
    """
    from kacli.fsutil import sha256_file

    names = manifest.task_names
    if len(paths) != len(names):
        raise KacliError(
            f"give one --teacher per task, in the order of tasks.yaml ({', '.join(names)}): got {len(paths)}",
            manifest.path,
        )
    by_ids = {tuple(t.category_ids): t.name for t in manifest.tasks}
    by_set = {frozenset(t.category_ids): t.name for t in manifest.tasks}
    teachers: list[Teacher] = []
    for k, (raw_path, task) in enumerate(zip(paths, manifest.tasks)):
        path = resolve_checkpoint_path(raw_path)
        ckpt = load_checkpoint(path)
        if ckpt["kind"] != "detr":
            raise KacliError(f"is a {ckpt['kind']} checkpoint; teachers are DETR checkpoints", path)
        ids = [int(i) for i in ckpt["label_map"]["ids"]]
        try:  # each task class's teacher class, by name: None when the label map is the task's
            class_map = match_classes(ckpt["label_map"], task.name, task.category_names, manifest.renames, path)
        except KacliError:
            fits = by_ids.get(tuple(ids)) or by_set.get(frozenset(ids))
            if fits is not None and fits != task.name:
                raise KacliError(
                    f"teacher {k + 1} holds the categories of task {fits!r}, not of task {task.name!r}: teachers given "
                    f"in the wrong order? (give them in tasks.yaml's order: {', '.join(names)})",
                    path,
                ) from None
            raise
        if ids == list(task.category_ids) and class_map == list(range(len(ids))):
            class_map = None
        label_map = ckpt["label_map"] if class_map is None else task.label_map()
        model = build_model(ckpt).eval()
        teachers.append(
            Teacher(path.resolve(), sha256_file(path), task.name, label_map, model, ckpt.get("config") or {}, class_map)
        )
    first = teachers[0]
    for t in teachers[1:]:
        for what in ("d_model", "enc_layers", "stride"):
            a, b = getattr(first, what), getattr(t, what)
            if a != b:
                label = {"d_model": "d_model", "enc_layers": "encoder depth", "stride": "backbone stride"}[what]
                raise KacliError(f"{label} {b} differs from teacher 1's ({first.path.name}: {a}); all teachers must share it", t.path)
    return teachers


def resolve_aug(teachers: Sequence[Teacher], config: str | Path | None, log: Callable[[str], None]) -> AugConfig:
    """The views' augmentation: ``--config``'s ``aug`` section if given, else the first teacher's."""
    if config is not None:
        from kacli.engine.runconfig import load_run_config

        return load_run_config(config, {}).aug
    aug = teachers[0].config.get("aug") if isinstance(teachers[0].config, dict) else None
    if aug is None:
        log(f"{teachers[0].path.name} records no augmentation config: using DETR's (pass --config to choose)")
        return AugConfig()
    return from_dict(aug, AugConfig, teachers[0].path)


# -- the plan: every entry's view and token count --------------------------------------------------


@dataclass
class EntryPlan:
    """Every entry of the cache, decided before any teacher runs.

    Arrays (E entries): ``image_index`` and ``image_id`` (E,) int64, ``view_index`` (E,) int64,
    ``view`` (E, 7) float64 (:meth:`View.to_list`), ``hw`` (E, 2) int64 token grid.
    """

    image_index: np.ndarray
    image_id: np.ndarray
    view_index: np.ndarray
    view: np.ndarray
    hw: np.ndarray
    images: int
    views_per_image: int

    @property
    def entries(self) -> int:
        return len(self.image_index)

    @property
    def tokens(self) -> np.ndarray:
        """(E,) int64 tokens per entry, h·w."""
        return self.hw[:, 0] * self.hw[:, 1]

    def offsets(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """(end−start+1,) int64 row offsets of entries [start, end), starting at 0."""
        end = self.entries if end is None else end
        return np.concatenate([[0], np.cumsum(self.tokens[start:end])]).astype(np.int64)

    def view_list(self) -> list[tuple[int, View]]:
        return [(int(i), View.from_list(v)) for i, v in zip(self.image_index, self.view)]


def image_size(coco: CocoDetection, index: int) -> tuple[int, int]:
    """(H, W) of image ``index``: from the json when it says, else from the file's header."""
    info = coco.image_info(index)
    h, w = info.get("height"), info.get("width")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    from PIL import Image

    from kacli.data.transforms import open_image

    path = coco.image_path(index)
    try:
        with open_image(path) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise KacliError(f"not a readable image ({type(e).__name__})", path) from None
    return int(h), int(w)


def entry_view(h: int, w: int, image_index: int, view_index: int, aug: AugConfig, seed: int) -> View:
    """The view of entry (image_index, view_index): a pure function of (seed, image, view).

    View 0 is the evaluation view; view ``v > 0`` is the training view that
    ``CocoDetection(train=True, generator_seed=seed)`` samples for the image in epoch ``v``.
    """
    if view_index == 0:
        return eval_view(h, w, aug.eval_size, aug.max_size)
    g = torch.Generator().manual_seed(item_seed(seed, view_index, image_index))
    return sample_train_view(h, w, aug, g)


def plan_entries(coco: CocoDetection, aug: AugConfig, views: int, seed: int, stride: int) -> EntryPlan:
    """Entry ``e = i·K + v`` for image ``i`` and view ``v`` in ``0..K−1``."""
    n = coco.num_images
    E = n * views
    image_index = np.repeat(np.arange(n, dtype=np.int64), views)
    view_index = np.tile(np.arange(views, dtype=np.int64), n)
    image_id = np.array([int(coco.image_info(i)["id"]) for i in range(n)], dtype=np.int64)[image_index]
    view_arr = np.zeros((E, VIEW_LEN), dtype=np.float64)
    hw = np.zeros((E, 2), dtype=np.int64)
    for i in range(n):
        h, w = image_size(coco, i)
        for v in range(views):
            e = i * views + v
            view = entry_view(h, w, i, v, aug, seed)
            view_arr[e] = view.to_list((h, w))
            hw[e] = schema.token_grid(view.size[0], view.size[1], stride)
    return EntryPlan(image_index, image_id, view_index, view_arr, hw, n, views)


# -- the HDF5 file ---------------------------------------------------------------------------------


def _attr_value(key: str, value):
    return json.dumps(value) if key in schema.JSON_ATTRS else value


def _normal(attrs: dict) -> dict:
    """Attributes as they read back (JSON round trip), for comparisons."""
    return {k: json.loads(json.dumps(v)) for k, v in attrs.items()}


def create_file(
    path: Path,
    attrs: dict,
    plan: EntryPlan,
    start: int,
    end: int,
    teachers: Sequence[Teacher],
    layers: Sequence[str],
    dtype: str,
    chunk: int,
) -> None:
    """Create the cache file for entries [start, end) with every dataset preallocated (chunked,
    unfiltered); the entry tables and offsets are written now, the teachers' data later."""
    E = end - start
    offsets = plan.offsets(start, end)
    T = int(offsets[-1])
    d = teachers[0].d_model
    with schema.open_h5(path, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = _attr_value(k, v)
        f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        f.attrs["done_entries"] = 0
        f.create_dataset("offsets", data=offsets)
        g = f.create_group("entries")
        g.create_dataset("image_index", data=plan.image_index[start:end])
        g.create_dataset("image_id", data=plan.image_id[start:end])
        g.create_dataset("view_index", data=plan.view_index[start:end])
        g.create_dataset("view", data=plan.view[start:end])
        g.create_dataset("hw", data=plan.hw[start:end])
        for k, t in enumerate(teachers):
            tg = f.create_group(f"teachers/{k}")
            tg.attrs["task"] = t.task
            tg.attrs["checkpoint"] = str(t.path)
            tg.attrs["sha256"] = t.sha256
            for layer in layers:
                tg.create_dataset(
                    f"seq/{layer}", shape=(T, d), dtype=schema.DTYPES[dtype], chunks=(max(1, min(chunk, T)), d)
                )
            if dtype in schema.SCALED:
                tg.create_dataset("scale", shape=(T, len(layers)), dtype=np.float32,
                                  chunks=(max(1, min(chunk, T)), len(layers)))
            q, c = t.num_queries, t.num_classes
            per = max(1, min(E, (64 << 10) // (q * (c + 1) * 4)))
            tg.create_dataset("logits", shape=(E, q, c + 1), dtype=np.float32, chunks=(per, q, c + 1))
            tg.create_dataset("boxes", shape=(E, q, 4), dtype=np.float32, chunks=(per, q, 4))


def _try_resume(path: Path, attrs: dict, log: Callable[[str], None]) -> int | None:
    """``done_entries`` of a partial file written with the same attributes, else None (and the
    partial file is removed, saying why)."""
    if not path.exists():
        return None
    why = None
    try:
        with schema.open_h5(path, "r") as f:
            layout = schema.validate(f, path, require_complete=False)
            diff = _same_attrs(layout.attrs, attrs)
            if diff:
                why = f"it was made with other settings ({diff})"
            else:
                done = int(layout.attrs["done_entries"])
                if not 0 <= done <= layout.entries:
                    why = f"its done_entries ({done}) is out of range"
                else:
                    return done
    except schema.CacheLockedError:
        raise
    except KacliError as e:
        why = f"it is unreadable ({e.message}; killed during a write?)"
    log(f"starting {path.name} over: {why}")
    path.unlink()
    return None


class _BackgroundWriter:
    """Writes batches to the open HDF5 file in a thread, so writing overlaps the next forward.

    After each batch: flush, advance ``done_entries``, flush again.
    """

    def __init__(self, f, start: int, offsets: np.ndarray, layers: Sequence[str], num_teachers: int):
        self.f = f
        self.start = start
        self.offsets = offsets
        self.layers = list(layers)
        self.seq = [[f[schema.seq_path(k, layer)] for layer in layers] for k in range(num_teachers)]
        self.logits = [f[f"teachers/{k}/logits"] for k in range(num_teachers)]
        self.boxes = [f[f"teachers/{k}/boxes"] for k in range(num_teachers)]
        self.scale = [f.get(schema.scale_path(k)) for k in range(num_teachers)]  # int8 only
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        self.batches = 0
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, e0: int, e1: int, payload: list[dict]) -> None:
        self.check()
        while True:
            try:
                self.queue.put((e0, e1, payload), timeout=0.5)
                return
            except queue.Full:
                self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                self._write(*item)
        except BaseException as e:  # handed to the main thread
            self.error = e
            while True:  # keep draining so the producer never blocks forever
                try:
                    if self.queue.get(timeout=0.5) is None:
                        return
                except queue.Empty:
                    continue

    def _write(self, e0: int, e1: int, payload: list[dict]) -> None:
        a, b = e0 - self.start, e1 - self.start
        r0, r1 = int(self.offsets[a]), int(self.offsets[b])
        for k, out in enumerate(payload):
            for ds, arr in zip(self.seq[k], out["seqs"]):
                ds[r0:r1] = arr
            if out["scale"] is not None:
                self.scale[k][r0:r1] = out["scale"]
            self.logits[k][a:b] = out["logits"]
            self.boxes[k][a:b] = out["boxes"]
        self.f.flush()
        self.f.attrs["done_entries"] = b
        self.f.flush()
        self.batches += 1
        if self.kill_after and self.batches >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def stored_sequences(picked: Sequence[torch.Tensor], store_dtype: torch.dtype) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The cached layers' valid tokens ``[(n, d)] * L`` as stored: ``(seqs [(n, d)] * L, scale)``,
    ``scale`` (n, L) float32 for int8 (:func:`quantize_int8`, computed where the teacher ran), else None."""
    if store_dtype != torch.int8:
        return [x.to(store_dtype).cpu().numpy() for x in picked], None
    pairs = [quantize_int8(x) for x in picked]
    return [q.cpu().numpy() for q, _ in pairs], torch.stack([s for _, s in pairs], 1).cpu().numpy()


@torch.inference_mode()
def run_teacher(
    teacher: Teacher,
    images: torch.Tensor,
    mask: torch.Tensor,
    hw: np.ndarray,
    layer_index: Sequence[int],
    store_dtype: torch.dtype,
    amp: bool,
    first_entry: int,
) -> dict:
    """One teacher on one batch → ``{"seqs": [(Σ h·w, d) per layer], "scale": (Σ h·w, L) | None,
    "logits" (B,Q,C+1), "boxes" (B,Q,4)}`` as numpy arrays; sequences keep each entry's valid
    tokens, row-major, entries in batch order (``scale``: int8 storage only, see :func:`stored_sequences`).

    ``layer_index`` picks from ``[enc_proj, enc_layers[0], ...]``. The valid tokens are those the
    model's ``enc_mask`` marks; they must form the entry's top-left ``h × w`` grid (``hw`` (B, 2)).
    """
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        out = teacher.model(images, mask)
    valid = ~out["enc_mask"]  # (B, n)
    hp, wp = (int(v) for v in out["enc_hw"])
    grid = valid.reshape(len(valid), hp, wp).cpu()
    for b, (h, w) in enumerate(hw.tolist()):
        g = grid[b]
        if int(g.sum()) != h * w or not bool(g[:h, :w].all()):
            raise KacliError(
                f"entry {first_entry + b}: the teacher's feature-map mask has {int(g.sum())} valid tokens, expected the "
                f"top-left {h}x{w} = ceil(view size / stride {teacher.stride})",
                teacher.path,
            )
    layers = [out["enc_proj"], *out["enc_layers"]]
    seqs, scale = stored_sequences([layers[i][valid] for i in layer_index], store_dtype)
    return {
        "seqs": seqs,
        "scale": scale,
        "logits": (out["pred_logits"].float() if teacher.class_map is None
                   else remap_logits(out["pred_logits"].float(), teacher.class_map)).cpu().numpy(),
        "boxes": out["pred_boxes"].float().cpu().numpy(),
    }


def write_range(
    path: Path,
    attrs: dict,
    plan: EntryPlan,
    start: int,
    end: int,
    teachers: Sequence[Teacher],
    layers: Sequence[str],
    dtype: str,
    batch_size: int,
    chunk: int,
    dataset: CocoDetection,
    device: torch.device,
    workers: int,
    log: Callable[[str], None],
    progress: bool,
    description: str,
) -> dict:
    """Cache entries [start, end) into ``path`` (created, or resumed when it holds the same
    attributes). ``start`` is a multiple of ``batch_size``. Returns ``{"resumed_from", "seconds"}``."""
    done = _try_resume(path, attrs, log)
    if done is None:
        create_file(path, attrs, plan, start, end, teachers, layers, dtype, chunk)
        done = 0
    elif done:
        log(f"resuming {path.name} at entry {start + done} ({done} of {end - start} done)")
    first = start + done
    batches = [list(range(b, min(b + batch_size, end))) for b in range(first, end, batch_size)]
    stride = teachers[0].stride
    store_dtype = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}[dtype]
    layer_index = [0 if n == "proj" else int(n[3:]) for n in layers]
    amp = device.type == "cuda"
    for t in teachers:
        t.model.to(device)
    t0 = time.perf_counter()
    if batches:
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=functools.partial(collate, size_divisibility=stride),
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        it = iter(loader)  # start the workers before the file is open and the writer thread runs
        offsets = plan.offsets(start, end)
        with schema.open_h5(path, "r+") as f, make_progress("entry", disable=not progress) as bar:
            task = bar.add_task(description, total=end - start, completed=done, info="")
            writer = _BackgroundWriter(f, start, offsets, layers, len(teachers))
            try:
                for idx, (images, mask, _targets) in zip(batches, it):
                    images = images.to(device, non_blocking=True)
                    mask = mask.to(device, non_blocking=True)
                    hw = plan.hw[idx[0] : idx[-1] + 1]
                    payload = [
                        run_teacher(t, images, mask, hw, layer_index, store_dtype, amp, idx[0]) for t in teachers
                    ]
                    writer.put(idx[0], idx[-1] + 1, payload)
                    bar.update(task, advance=len(idx))
            finally:
                writer.close()
        del it, loader
    return {"resumed_from": start + done if done else None, "seconds": time.perf_counter() - t0}


def shard_plan(attrs: dict, tokens: np.ndarray, num_batches: int, batch_size: int, world: int, out: Path) -> list[dict]:
    """Contiguous batch ranges per rank: ``[{"rank", "path", "attrs"}]`` for the ranks with work.

    A shard's attributes are the cache's with its own ``entries``, ``total_tokens`` and ``shard``
    (``{rank, world_size, start, end}``)."""
    E = int(attrs["entries"])
    shards = []
    for k in range(world):
        start = min(E, (k * num_batches // world) * batch_size)
        end = min(E, ((k + 1) * num_batches // world) * batch_size)
        if end <= start:
            continue
        sa = dict(attrs)
        sa.update(
            entries=end - start,
            total_tokens=int(tokens[start:end].sum()),
            shard={"rank": k, "world_size": world, "start": start, "end": end},
        )
        shards.append({"rank": k, "path": Path(f"{out}.rank{k}.partial"), "attrs": sa})
    return shards


def _same_attrs(have: dict, want: dict) -> str | None:
    """The first attribute (volatile ones aside) that differs, or None."""
    have = {k: v for k, v in have.items() if k not in VOLATILE_ATTRS}
    want = _normal({k: v for k, v in want.items() if k not in VOLATILE_ATTRS})
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return diff[0] if diff else None


def wait_for_shards(shards: Sequence[dict], log: Callable[[str], None], poll: float = 1.0) -> None:
    """Block until every shard file is complete and made with this run's settings.

    Files are polled rather than waited for with a collective, so a rank that finishes long before
    the others (e.g. one resumed with nothing left to do) never hits a process-group timeout."""
    said = False
    for sh in shards:
        path, want = sh["path"], sh["attrs"]
        while True:
            try:
                with schema.open_h5(path, "r") as f:
                    have = schema.read_attrs(f)
                if int(have.get("done_entries", -1)) == int(want["entries"]) and _same_attrs(have, want) is None:
                    break
            except KacliError:
                pass  # not created yet, or open for writing (HDF5 locks it)
            if not said:
                log("waiting for the other ranks' shards")
                said = True
            time.sleep(poll)


def _copy_rows(src, dst, r0: int, rows_per_block: int) -> None:
    """``dst[r0 : r0 + len(src)] = src``, a block of rows at a time."""
    n = src.shape[0]
    for a in range(0, n, rows_per_block):
        b = min(n, a + rows_per_block)
        dst[r0 + a : r0 + b] = src[a:b]


def join_shards(out_partial: Path, shards: Sequence[dict], attrs: dict, plan: EntryPlan,
                teachers: Sequence[Teacher], layers: Sequence[str], dtype: str, chunk: int,
                block_bytes: int = 64 << 20) -> None:
    """Copy complete rank shards (see :func:`shard_plan`) into one file holding all entries."""
    create_file(out_partial, attrs, plan, 0, plan.entries, teachers, layers, dtype, chunk)
    offsets = plan.offsets()
    d = teachers[0].d_model
    itemsize = np.dtype(schema.DTYPES[dtype]).itemsize
    rows_per_block = max(1, block_bytes // (d * itemsize))
    with schema.open_h5(out_partial, "r+") as dst:
        for sh in shards:
            spath, start, end = sh["path"], sh["attrs"]["shard"]["start"], sh["attrs"]["shard"]["end"]
            with schema.open_h5(spath, "r") as src:
                schema.validate(src, spath, require_complete=True)
                r0 = int(offsets[start])
                for k in range(len(teachers)):
                    for layer in layers:
                        name = schema.seq_path(k, layer)
                        _copy_rows(src[name], dst[name], r0, rows_per_block)
                    if dtype in schema.SCALED:
                        _copy_rows(src[schema.scale_path(k)], dst[schema.scale_path(k)], r0, rows_per_block)
                    for name in (f"teachers/{k}/logits", f"teachers/{k}/boxes"):
                        dst[name][start:end] = src[name][...]
        dst.flush()
        dst.attrs["done_entries"] = plan.entries
        dst.flush()


# -- the command -----------------------------------------------------------------------------------


def _existing_output(out: Path, attrs: dict, force: bool) -> bool:
    """True when ``out`` is a complete cache with the same content (nothing to do). An existing
    file made otherwise is an error unless ``force``."""
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
    want = schema.content_signature(_normal(attrs))
    key = schema.first_difference(have, want)
    if key is None and not force:
        return True
    if key is not None and not force:
        what = {
            "teacher_sha256": "other teachers",
            "tasks_sha256": "another tasks.yaml",
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


def _check_disk(folder: Path, need: int, what: str) -> int:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise KacliError(
            f"not enough free disk for {what}: needs about {schema.human_bytes(need)}, {schema.human_bytes(free)} free",
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
) -> dict:
    """Run the teachers over ``views`` views of every image of ``split`` and write ``out`` (HDF5).

    Returns a summary: ``{"out", "status" ("written" | "up to date"), "entries", "images", "views",
    "tokens", "layers", "teachers", "dtype", "estimated_bytes", "bytes", "seconds", "entries_per_s",
    "resumed_from"}``. With ``estimate_only`` nothing runs and nothing is written: the summary has
    ``status`` "estimate", ``estimates`` ({dtype: bytes} for every storage scheme) and
    ``free_bytes`` (free disk where ``out`` would go), and ``bytes`` None.
    """
    if views < 1:
        raise KacliError(f"--views must be at least 1, got {views}")
    from kacli.limits import max_views

    if views > max_views():
        raise KacliError(f"--views {views} is over the limit of {max_views()} views per image "
                         "(set KACLI_MAX_VIEWS to raise it)")
    if batch_size < 1:
        raise KacliError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise KacliError(f"--workers must not be negative, got {workers}")
    if dtype not in schema.DTYPES:
        raise KacliError(f"--dtype must be one of {', '.join(schema.DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.is_dir():
        raise KacliError("output is a folder, expected a .h5 file path", out)
    manifest = TaskManifest(tasks)
    json_path = manifest.split_json(split)
    image_root = manifest.image_root(split)
    loaded = load_teachers(manifest, teachers)
    first = loaded[0]
    aug = resolve_aug(loaded, config, log)
    layer_list = schema.layer_names(layers, first.enc_layers)
    union = manifest.student_label_map()  # a category two tasks share is one class

    dist = distributed.init_distributed(device)
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
        progress = False

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
        "teacher_settings": recorded_settings(first.model.cfg.to_dict(), first.config),
        "view_policy": schema.VIEW_POLICY,
        "batch_size": int(batch_size),
        "entries": int(E),
        "images": int(plan.images),
        "total_tokens": int(tokens.sum()),
    }
    heads = [(t.num_queries, t.num_classes) for t in loaded]
    estimate = schema.estimate_bytes(int(tokens.sum()), E, first.d_model, len(layer_list), heads, dtype)
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
        estimates = schema.size_estimates(int(tokens.sum()), E, first.d_model, len(layer_list), heads)
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
    num_batches = -(-E // batch_size)
    t0 = time.perf_counter()

    if not dist.distributed:
        _check_disk(out.parent, estimate, "the cache")
        res = write_range(
            partial, attrs, plan, 0, E, loaded, layer_list, dtype, batch_size, chunk, dataset,
            dist.device, workers, log, progress, "cache-teachers",
        )
        os.replace(partial, out)
        summary["resumed_from"] = res["resumed_from"]
    else:
        W, r = dist.world_size, dist.rank
        shards = shard_plan(attrs, tokens, num_batches, batch_size, W, Path(out))
        mine = [sh for sh in shards if sh["rank"] == r]
        if mine:
            sh = mine[0]
            start, end = sh["attrs"]["shard"]["start"], sh["attrs"]["shard"]["end"]
            share = schema.estimate_bytes(int(tokens[start:end].sum()), end - start, first.d_model, len(layer_list), heads, dtype)
            _check_disk(out.parent, share + (estimate if dist.is_main else 0), f"rank {r}'s shard")
            res = write_range(
                sh["path"], sh["attrs"], plan, start, end, loaded, layer_list, dtype, batch_size, chunk, dataset,
                dist.device, workers, log, progress, f"cache-teachers rank {r}",
            )
            summary["resumed_from"] = res["resumed_from"]
        if not dist.is_main:
            return summary | {"status": f"wrote shard {r}", "bytes": None, "seconds": time.perf_counter() - t0,
                              "entries_per_s": None}
        wait_for_shards(shards, log)
        log(f"joining {len(shards)} shards into {out.name}")
        join_shards(partial, shards, attrs, plan, loaded, layer_list, dtype, chunk)
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


__all__ = [
    "KILL_ENV",
    "Teacher",
    "EntryPlan",
    "load_teachers",
    "resolve_aug",
    "entry_view",
    "plan_entries",
    "create_file",
    "run_teacher",
    "write_range",
    "shard_plan",
    "wait_for_shards",
    "join_shards",
    "cache_teachers",
]
