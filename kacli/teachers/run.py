"""One teacher on one batch: its outputs with the feature map's valid tokens picked.

:func:`run_teacher` is what ``cache-teachers`` stores for every entry (the cache converts the
sequences to its storage dtype, :mod:`kacli.cache.extract`): the chosen layers' valid tokens,
row-major and entries in batch order, the class logits in the task's class order + no object,
whatever the teacher's classifier (:func:`kacli.teachers.labels.teacher_logits`) and the boxes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kacli.errors import KacliError
from kacli.teachers.labels import teacher_logits
from kacli.teachers.load import Teacher


@torch.inference_mode()
def run_teacher(
    teacher: Teacher,
    images: torch.Tensor,
    mask: torch.Tensor,
    hw: np.ndarray,
    layer_index: Sequence[int],
    amp: bool,
    first_entry: int,
) -> dict:
    """One teacher on one batch → ``{"seqs": [(Σ h·w, d) per layer], "logits" (B,Q,C+1) float32,
    "boxes" (B,Q,4) float32}`` as tensors on the teacher's device; sequences keep each entry's
    valid tokens, row-major, entries in batch order, in the dtype the teacher ran in (none for a
    teacher without sequences: a multi-scale transformers folder teaches through TA only).

    ``layer_index`` picks from ``[enc_proj, enc_layers[0], ...]``, leaving out the layers the teacher
    does not give (None there: an RT-DETR hybrid encoder gives the last layer only). The valid tokens are those the
    model's ``enc_mask`` marks; they must form the entry's top-left ``h × w`` grid (``hw`` (B, 2);
    ``first_entry`` numbers the batch's entries in the error).
    """
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        out = teacher.model(images, mask)
    logits = teacher_logits(out["pred_logits"].float(), teacher.model.classifier, teacher.class_map)
    if not teacher.sequences:  # a transformers teacher: predictions only (TA)
        return {"seqs": [], "logits": logits, "boxes": out["pred_boxes"].float()}
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
    layers = [out["enc_proj"], *out["enc_layers"]]  # None where the teacher has no such layer (Teacher.gives)
    return {
        "seqs": [layers[i][valid] for i in layer_index if layers[i] is not None],
        "logits": logits,
        "boxes": out["pred_boxes"].float(),
    }


__all__ = ["run_teacher"]
