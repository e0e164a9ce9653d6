"""The teachers run inside the training loop (``kacli amalgamate --teacher ...``): :class:`OnlineTeachers`.

Instead of reading a cache written by ``cache-teachers``, the objective runs the frozen teacher
DETRs on each batch the student sees and arranges their outputs as
:func:`kacli.cache.reader.collate_cached` gives the cached ones (``seqs``, ``token_mask``,
``logits``, ``boxes``: what the losses read), so the same losses apply to both.
The teachers are never trained: they stay in eval mode (whatever ``.train()`` is called with),
run without gradients, are in no optimiser and in no checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kacli.teachers.labels import teacher_logits
from kacli.teachers.layers import layer_outputs
from kacli.teachers.load import Teacher


class OnlineTeachers(nn.Module):
    """N frozen teacher DETRs that turn a batch into the ``teacher`` dict of ``collate_cached``.

    Args:
        models: the teacher DETRs, in the manifest's task order (they share d_model, encoder
            depth and backbone stride: :func:`kacli.teachers.load.load_teachers` checks it).
        layers: the layers to return, in the order of ``seqs``' L axis (``proj``, ``enc1``, …:
            ``proj`` is the projected backbone sequence, ``encI`` encoder layer I's output).
        class_maps: per teacher, None, or the teacher class of each of its task's classes
            (:func:`kacli.teachers.labels.match_classes`): its logits are then remapped to the
            task's classes (:func:`kacli.teachers.labels.teacher_logits`), as the cache stores them.
        sequences: per teacher, whether it gives sequences (default all); a transformers folder of a
            multi-scale family (:mod:`kacli.teachers.hf`) does not: it gives predictions only, and
            ``seqs``' N axis holds the others (N_s of them), as the cache does. A layer a teacher does
            not give (an RT-DETR hybrid encoder gives the last layer only) stays zero there.

    ``forward(images (B,3,H,W), mask (B,H,W) True=pad)`` with H and W multiples of the
    teachers' stride returns ``{"seqs" (B,N_s,L,n,d) float32, "token_mask" (B,n) bool True=pad,
    "logits" [(B,Q_t,C_t+1) float32] * N, "boxes" [(B,Q_t,4) float32] * N}``, ``n = (H/stride)·
    (W/stride)`` tokens row-major, zeros in ``seqs`` at padding. Under autocast the teachers run
    in its dtype; the outputs are float32 as the cache reader gives them.
    """

    def __init__(self, models: Sequence[nn.Module], layers: Sequence[str],
                 class_maps: Sequence[Sequence[int] | None] | None = None, sequences: Sequence[bool] | None = None):
        super().__init__()
        if not models:
            raise ValueError("OnlineTeachers needs at least one teacher")
        self.models = nn.ModuleList(models)
        self.layers = list(layers)
        self.sequences = [bool(x) for x in (sequences if sequences is not None else [True] * len(models))]
        if len(self.sequences) != len(self.models) or not any(self.sequences):
            raise ValueError("OnlineTeachers needs one sequences flag per teacher, at least one True")
        maps = list(class_maps or [None] * len(models))
        if len(maps) != len(self.models):
            raise ValueError(f"{len(maps)} class maps for {len(self.models)} teachers")
        # index tensors made once, moved with the module: no host-to-device copy per step
        for k, c in enumerate(maps):
            if c is not None:
                self.register_buffer(f"class_map_{k}", torch.as_tensor(list(c), dtype=torch.long), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_teachers(cls, teachers: Sequence[Teacher], layers: Sequence[str]) -> OnlineTeachers:
        """The models and class maps of :func:`kacli.teachers.load.load_teachers`' teachers."""
        return cls([t.model for t in teachers], layers, [t.class_map for t in teachers], [t.sequences for t in teachers])

    def train(self, mode: bool = True) -> OnlineTeachers:
        """Always eval mode: the teachers' dropout and batch statistics stay off."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        first = next(self.parameters(), None)
        if first is not None and first.device != images.device:
            self.to(images.device)
        seqs = None  # (B, N_s, L, n, d) float32, filled in place
        logits, boxes = [], []
        token_mask = None
        n_seq = sum(self.sequences)
        part = 0
        for k, model in enumerate(self.models):
            out = model(images, mask)
            if self.sequences[k]:
                for j, x in enumerate(layer_outputs(out, self.layers)):
                    if x is None:  # a layer this teacher does not give (RT-DETR hybrid encoders): zeros, left out of SA
                        continue
                    if seqs is None:
                        seqs = x.new_zeros((x.shape[0], n_seq, len(self.layers), *x.shape[1:]), dtype=torch.float32)
                    seqs[:, part, j] = x
                token_mask = out["enc_mask"]
                part += 1
            lg = out["pred_logits"].float()
            class_map = getattr(self, f"class_map_{k}", None)
            logits.append(teacher_logits(lg, model.classifier, class_map))
            boxes.append(out["pred_boxes"].float())
        seqs.masked_fill_(token_mask[:, None, None, :, None], 0.0)  # zeros at padding, as cached
        return {"seqs": seqs, "token_mask": token_mask.bool(), "logits": logits, "boxes": boxes}


__all__ = ["OnlineTeachers"]
