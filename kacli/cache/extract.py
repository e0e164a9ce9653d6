"""The teachers run over a cache's entries, their outputs as the file stores them.

:func:`teacher_batches` runs a :class:`~kacli.cache.plan.CacheJob`'s teachers
(:func:`kacli.teachers.run.run_teacher`) over consecutive entries (images decoded by DataLoader
workers, padded to the stride) and gives each batch's outputs as stored: the cached layers' valid
tokens in the storage dtype (:func:`stored_sequences`), logits and boxes.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from kacli.cache.plan import CacheJob
from kacli.data.dataset import collate
from kacli.errors import KacliError
from kacli.teachers.load import Teacher, sequence_teachers
from kacli.teachers.quant import quantize_int8
from kacli.teachers.run import run_teacher

#: Storage dtype of each ``--dtype``.
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}


def stored_sequences(picked: Sequence[torch.Tensor], store_dtype: torch.dtype) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The cached layers' valid tokens ``[(n, d)] * L`` as stored: ``(seqs [(n, d)] * L, scale)``,
    ``scale`` (n, L) float16 for int8 (:func:`quantize_int8`, computed where the teacher ran), else None."""
    if store_dtype != torch.int8 or not picked:  # no sequences: a teacher that teaches through TA only
        return [x.to(store_dtype).cpu().numpy() for x in picked], None
    pairs = [quantize_int8(x) for x in picked]
    return [q.cpu().numpy() for q, _ in pairs], torch.stack([s for _, s in pairs], 1).cpu().numpy()


class NonFiniteOutputs(KacliError):
    """A teacher gave NaN or infinite outputs: the cache being written is worthless and removed."""


def check_finite_outputs(teacher: Teacher, out: dict, hw: np.ndarray, first_entry: int) -> None:
    """Refuse a batch whose outputs hold NaN or inf, naming the teacher and the first such entry."""
    bad: list[int] = []
    for name in ("logits", "boxes"):
        ok = torch.isfinite(out[name].flatten(1)).all(1)
        if not bool(ok.all()):
            bad.append(int((~ok).nonzero()[0]))
    ends = np.cumsum([int(h) * int(w) for h, w in np.asarray(hw).tolist()])
    for x in out["seqs"]:
        ok = torch.isfinite(x).all(-1)
        if not bool(ok.all()):
            bad.append(int(np.searchsorted(ends, int((~ok).nonzero()[0]), side="right")))
    if bad:
        raise NonFiniteOutputs(f"teacher {teacher.task!r} gives NaN or infinite outputs at entry {first_entry + min(bad)}; "
                               "nothing was kept (check its weights: kacli eval --model on it)", teacher.path)


@torch.inference_mode()
def stored_outputs(teacher: Teacher, images: torch.Tensor, mask: torch.Tensor, hw: np.ndarray,
                   layer_index: Sequence[int], store_dtype: torch.dtype, amp: bool, first_entry: int) -> dict:
    """:func:`run_teacher` as the cache stores it: ``{"seqs": [(Σ h·w, d) per layer], "scale": (Σ h·w, L) | None,
    "logits" (B,Q,C+1), "boxes" (B,Q,4)}`` numpy arrays (``scale``: int8 storage only, see :func:`stored_sequences`)."""
    out = run_teacher(teacher, images, mask, hw, layer_index, amp, first_entry)
    check_finite_outputs(teacher, out, hw, first_entry)
    seqs, scale = stored_sequences(out["seqs"], store_dtype)
    return {"seqs": seqs, "scale": scale, "logits": out["logits"].cpu().numpy(), "boxes": out["boxes"].cpu().numpy()}


def teacher_batches(job: CacheJob, batches: Sequence[list[int]]) -> Iterator[tuple[list[int], list[dict]]]:
    """Run ``job``'s teachers over ``batches`` (lists of consecutive entries): yields ``(entries,
    [stored_outputs(...) per teacher])`` per batch, in order.

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
    stride = sequence_teachers(job.teachers)[0].stride
    loader = DataLoader(
        job.dataset,
        batch_sampler=batches,
        num_workers=job.workers,
        collate_fn=functools.partial(collate, size_divisibility=stride),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if job.workers > 0 else None,
    )
    it = iter(loader)  # start the workers now

    def run() -> Iterator[tuple[list[int], list[dict]]]:
        for idx, (images, mask, _targets) in zip(batches, it):
            images = images.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            hw = job.plan.hw[idx[0] : idx[-1] + 1]
            yield idx, [stored_outputs(t, images, mask, hw, layer_index, store_dtype, amp, idx[0]) for t in job.teachers]

    return run()


__all__ = ["STORE_DTYPES", "stored_outputs", "stored_sequences", "teacher_batches"]
