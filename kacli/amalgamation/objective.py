"""The loss a method trains with, as the trainer calls it (:class:`AmalgamationObjective`), and
what it reads from the teacher cache (:meth:`AmalgamationObjective.needs`).

Every loss term goes into ``metrics.jsonl`` (the trainer logs every key of the loss dict):
``loss_seq``, ``loss_task``, ``loss_d`` (unweighted), their parts (``sa_proj``, ``sa_enc1``, …,
``loss_ta_kl``, …, ``loss_ce``, …) and ``total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from kacli.amalgamation.config import AmalgamateConfig
from kacli.engine.train import to_device
from kacli.losses.ground_truth import GroundTruthLoss
from kacli.losses.sequence import SAGProjection, sa_loss, sag_loss
from kacli.losses.task import TaskAmalgamationLoss
from kacli.teachers.layers import layer_outputs
from kacli.teachers.online import OnlineTeachers
from kacli.teachers.quant import dequantize_teacher


@dataclass(frozen=True)
class CacheNeeds:
    """What a method reads from the teacher cache.

    Attributes:
        layers: the cached layers to load, in the order of the batch's ``seqs`` L axis (at least
            one: the reader returns one even when no loss reads it).
        teacher: the batches carry the teachers' outputs; False: images and ground truth only.
    """

    layers: list[str]
    teacher: bool


def uses_ground_truth(cfg: AmalgamateConfig) -> bool:
    """The ground-truth loss is on: DETR's and ``raw-ext``'s only loss (weight 1), else weighted by λ_d."""
    return cfg.plain_detr or cfg.method == "raw-ext" or cfg.lambda_d > 0


def uses_pseudo_labels(cfg: AmalgamateConfig) -> bool:
    """The ground-truth loss adds the teachers' confident predictions as hard labels (``pseudo-gt``)."""
    return cfg.ground_truth_loss == "pseudo-gt" and uses_ground_truth(cfg)


def uses_sequences(cfg: AmalgamateConfig) -> bool:
    """L_seq (SA for ``ka``, SAG for ``sag``) is on and weighted."""
    return cfg.method in ("ka", "sag") and cfg.sa.enabled and cfg.lambda_seq > 0


def uses_predictions(cfg: AmalgamateConfig) -> bool:
    """L_task (TA) is on and weighted."""
    return cfg.method in ("ka", "sag") and cfg.ta.enabled and cfg.lambda_task > 0


def teachers_pick_tokens(cfg: AmalgamateConfig, layers: Sequence[str]) -> bool:
    """``ka``'s redundancy compression chooses the kept tokens from the teachers' projected
    sequences (cached layer ``proj``) during at least part of training."""
    return cfg.method == "ka" and cfg.compress == "redundancy" and "proj" in layers and cfg.compress_guide > 0


def needs_teachers(cfg: AmalgamateConfig, layers: Sequence[str]) -> bool:
    """The batches must carry the teachers' outputs: a loss reads them (SA/SAG, TA, pseudo-labels),
    or ``ka``'s redundancy compression chooses tokens from the teachers' projected sequences."""
    return uses_sequences(cfg) or uses_predictions(cfg) or uses_pseudo_labels(cfg) or teachers_pick_tokens(cfg, layers)


class AmalgamationObjective(nn.Module):
    """The loss of one method, as the trainer calls it: ``(model, batch, device) → dict``.

    The batch is ``collate_cached``'s ``(images (B,3,H,W), mask (B,H,W), targets, teacher)`` with
    ``teacher`` = ``{"seqs" (B,N,L,n,d), "token_mask" (B,n), "logits" [(B,Q_t,C_t+1)],
    "boxes" [(B,Q_t,4)]}`` (``raw``, ``raw-partial`` and ``raw-ext`` ignore ``teacher``; it may
    be None; ``pseudo`` reads its logits and boxes). Targets keep ``complete`` (the classes each
    image is annotated for) for the ground-truth loss. With ``teachers`` (the teachers run
    online), a batch whose ``teacher`` is None gets it from them, on the training device (under
    the trainer's autocast), whenever the objective needs it.

    Args:
        cfg: the run's configuration.
        num_classes: C, the union label set's size.
        num_teachers: N, every teacher (TA reads each one's predictions).
        layers: names of the cached layers (``proj``, ``enc1``, …), in the order of ``seqs``' L axis.
        class_index: per teacher, the student class index of each of its classes.
        sag_proj: the SAG projections W_a (``sag`` only); optimise its parameters with the model.
        teachers: the frozen teachers run on every batch (:class:`~kacli.teachers.online.OnlineTeachers`
            over ``layers``); None: the batches carry the teachers' outputs (the cache).
        num_parts: N_s, the teachers with sequences (the student's parts, ``seqs``' N axis; a
            transformers folder of a multi-scale family teaches through TA only); default N.
        present: ``(N_s, L)`` bool, whether sequence teacher k gives layer j (an RT-DETR hybrid
            encoder gives the last layer only); the SA terms of the others are left out.
            None: all of them.
    """

    def __init__(self, cfg: AmalgamateConfig, num_classes: int, num_teachers: int, layers: list[str],
                 class_index: list[torch.Tensor], sag_proj: SAGProjection | None = None,
                 teachers: OnlineTeachers | None = None, num_parts: int | None = None,
                 present: Sequence[Sequence[bool]] | None = None):
        super().__init__()
        if teachers is not None and (len(teachers.models) != num_teachers or teachers.layers != list(layers)):
            raise ValueError(f"online teachers ({len(teachers.models)}, layers {teachers.layers}) do not match "
                             f"N={num_teachers}, layers {list(layers)}")
        self.teachers = teachers
        self.cfg = cfg
        self.method = cfg.method
        self.num_teachers = num_teachers
        self.num_parts = num_teachers if num_parts is None else int(num_parts)
        self.layers = list(layers)
        full = present is None or all(all(r) for r in present)
        if not full and cfg.method == "sag":
            raise ValueError("SAG needs every teacher's sequence at every layer")
        # (N_s, L) bool, moved with the objective: no host-to-device copy per step
        self.register_buffer("present", None if full else torch.tensor([list(map(bool, r)) for r in present]),
                             persistent=False)
        self.class_index = [torch.as_tensor(c, dtype=torch.long) for c in class_index]
        self.criterion = GroundTruthLoss(num_classes, cfg.ground_truth_loss, class_index=self.class_index,
                                         eos_coef=cfg.eos_coef, threshold=cfg.pseudo_threshold,
                                         iou_threshold=cfg.pseudo_iou, classifier=cfg.model.classifier)
        ta = cfg.ta
        self.ta = TaskAmalgamationLoss(
            num_classes, alpha=tuple(ta.alpha), alpha_conf=ta.alpha_conf, beta_kl=ta.beta_kl, beta_l1=ta.beta_l1,
            beta_giou=ta.beta_giou, threshold=ta.threshold, topk=ta.topk, temperature=ta.temperature,
            noobj_weight=ta.noobj_weight, classifier=cfg.model.classifier,
        )
        self.use_gt = uses_ground_truth(cfg)
        self.use_seq = uses_sequences(cfg)
        self.use_task = uses_predictions(cfg)
        if cfg.method == "sag" and sag_proj is None:
            raise ValueError("method sag needs its SAGProjection")
        self.sag_proj = sag_proj
        self.proj_layer = self.layers.index("proj") if "proj" in self.layers else None
        self.guided = cfg.compress_guide > 0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based): ``redundancy`` compression is guided
        by the teachers' X_T while ``epoch < round(compress_guide · epochs)``."""
        self.guided = epoch < round(self.cfg.compress_guide * epochs)

    @staticmethod
    def needs(cfg: AmalgamateConfig, cached: Sequence[str]) -> CacheNeeds:
        """What the objective of ``cfg`` reads from a cache holding the layers ``cached``: every
        cached layer for L_seq; else ``proj`` alone when ``ka``'s redundancy compression picks
        tokens (its guide); else the first layer, which no loss reads."""
        if uses_sequences(cfg):
            layers = list(cached)
        elif teachers_pick_tokens(cfg, cached):
            layers = ["proj"]
        else:
            layers = list(cached[:1])
        return CacheNeeds(layers, needs_teachers(cfg, layers))

    @property
    def needs_teacher(self) -> bool:
        """Whether the batch must carry the teachers' outputs: :func:`needs_teachers` of this
        objective's configuration and layers (the answer :meth:`needs` gave)."""
        return needs_teachers(self.cfg, self.layers)

    def forward(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, mask, targets, teacher = batch
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        keep = ("boxes", "labels", "complete")  # complete: the classes the image is annotated for
        targets = to_device([{k: t[k] for k in keep if k in t} for t in targets], device)
        if not self.needs_teacher:
            teacher = None
        elif teacher is not None:
            teacher = to_device(teacher, device)
        elif self.teachers is not None:
            teacher = self.teachers(images, mask)  # run online: the same dict, already on the device
        teacher = dequantize_teacher(teacher)  # int8 caches: float sequences, made on the device
        bare = model.module if hasattr(model, "module") else model
        compressed = getattr(bare, "compress", "none") != "none"
        if compressed and self.guided and teacher is not None and self.proj_layer is not None:
            out = model(images, mask, teacher_proj=teacher["seqs"][:, :, self.proj_layer])
        else:
            out = model(images, mask)

        losses: dict[str, torch.Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        if self.use_gt:
            gt = self.criterion(out, targets, teacher)
            gt.pop("class_error", None)
            gt_total = gt.pop("total")
            losses.update(gt)
            losses["loss_d"] = gt_total
            weight = 1.0 if (self.cfg.plain_detr or self.method == "raw-ext") else self.cfg.lambda_d
            total = total + weight * gt_total
        if self.use_seq:
            seq_total, parts = self.sequence_loss(out, teacher)
            losses.update(parts)
            losses["loss_seq"] = seq_total
            total = total + self.cfg.lambda_seq * seq_total
        if self.use_task:
            ta = self.ta(out, teacher["logits"], teacher["boxes"], self.class_index)
            ta_total = ta.pop("total")
            losses.update(ta)
            losses["loss_task"] = ta_total
            total = total + self.cfg.lambda_task * ta_total
        losses["total"] = total
        return losses

    def sequence_loss(self, out: dict, teacher: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SA (``ka``) or SAG (``sag``) over the cached layers; see :mod:`kacli.losses.sequence`."""
        seqs = teacher["seqs"]  # (B, N, L, n, d)
        if seqs.shape[1] != self.num_parts or seqs.shape[2] != len(self.layers):
            raise ValueError(f"teacher sequences {tuple(seqs.shape)} do not have N={self.num_parts} teachers "
                             f"and L={len(self.layers)} layers")
        n = out["enc_mask"].shape[1]
        if seqs.shape[3] != n or teacher["token_mask"].shape[1] != n:
            raise ValueError(f"cached token grid has {seqs.shape[3]} tokens, the student's feature map {n} "
                             f"({out['enc_hw'][0]}x{out['enc_hw'][1]})")
        if self.present is not None and self.present.device != seqs.device:
            self.present = self.present.to(seqs.device)  # once: the objective itself stays where it was built
        mask = out["enc_mask"] | teacher["token_mask"].to(torch.bool)
        student = layer_outputs(out, self.layers)
        targets = [seqs[:, :, j] for j in range(len(self.layers))]
        names = [f"sa_{name}" for name in self.layers]
        if self.method == "sag":
            student = [s.squeeze(1) if s.dim() == 4 else s for s in student]
            return sag_loss(student, targets, mask, self.sag_proj, normalize=self.cfg.sa.normalize,
                            names=[f"sag_{name}" for name in self.layers], reduction=self.cfg.sa.reduction,
                            stats=self.cfg.sa.stats)
        return sa_loss(student, targets, mask, self.num_parts, normalize=self.cfg.sa.normalize, names=names,
                       index=out.get("part_idx"), reduction=self.cfg.sa.reduction, stats=self.cfg.sa.stats,
                       present=self.present)


__all__ = ["AmalgamationObjective", "CacheNeeds", "needs_teachers", "teachers_pick_tokens", "uses_ground_truth", "uses_predictions",
           "uses_pseudo_labels", "uses_sequences"]
