"""The teachers: load and check them (``cache-teachers``, and ``amalgamate --teacher``), and run
them over batches of cache entries (``cache-teachers``).

:func:`load_teachers` loads one DETR checkpoint per task and checks that they fit the manifest and
each other; :func:`teacher_batches` runs them over consecutive entries of a
:class:`~kacli.cache.plan.CacheJob` (images decoded by DataLoader workers, padded to the stride)
and gives each batch's outputs as stored: the cached layers' valid tokens, logits and boxes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from kacli.cache.labels import match_classes, remap_logits
from kacli.cache.quant import quantize_int8
from kacli.data.dataset import collate
from kacli.data.manifest import TaskManifest
from kacli.errors import KacliError
from kacli.fsutil import sha256_file
from kacli.models.checkpoint import build_model, load_checkpoint, resolve_checkpoint_path

if TYPE_CHECKING:
    from kacli.cache.plan import CacheJob

#: Storage dtype of each ``--dtype``.
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}


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


def stored_sequences(picked: Sequence[torch.Tensor], store_dtype: torch.dtype) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The cached layers' valid tokens ``[(n, d)] * L`` as stored: ``(seqs [(n, d)] * L, scale)``,
    ``scale`` (n, L) float16 for int8 (:func:`quantize_int8`, computed where the teacher ran), else None."""
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


def teacher_batches(job: CacheJob, batches: Sequence[list[int]]) -> Iterator[tuple[list[int], list[dict]]]:
    """Run ``job``'s teachers over ``batches`` (lists of consecutive entries): yields ``(entries,
    [run_teacher(...) per teacher])`` per batch, in order.

    The teachers move to ``job.device`` and the DataLoader's workers start when this is called,
    before the caller opens the output file or starts its writer thread; the first batch runs at
    the first ``next``. Images come from ``job.dataset`` (the plan's views replayed), padded to a
    multiple of the teachers' stride; with CUDA the teachers run under float16 autocast."""
    device = job.device
    store_dtype = STORE_DTYPES[job.dtype]
    layer_index = [0 if n == "proj" else int(n[3:]) for n in job.layers]
    amp = device.type == "cuda"
    for t in job.teachers:
        t.model.to(device)
    loader = DataLoader(
        job.dataset,
        batch_sampler=batches,
        num_workers=job.workers,
        collate_fn=functools.partial(collate, size_divisibility=job.teachers[0].stride),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if job.workers > 0 else None,
    )
    it = iter(loader)  # start the workers now

    def run() -> Iterator[tuple[list[int], list[dict]]]:
        for idx, (images, mask, _targets) in zip(batches, it):
            images = images.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            hw = job.plan.hw[idx[0] : idx[-1] + 1]
            yield idx, [run_teacher(t, images, mask, hw, layer_index, store_dtype, amp, idx[0]) for t in job.teachers]

    return run()


__all__ = ["STORE_DTYPES", "Teacher", "load_teachers", "run_teacher", "stored_sequences", "teacher_batches"]
