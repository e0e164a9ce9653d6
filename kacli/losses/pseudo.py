"""Hard pseudo-labels: an image's ground truth plus the teachers' confident boxes of the classes it lacks.

Used two ways:

- the ``pseudo-gt`` ground-truth loss (:mod:`kacli.losses.ground_truth`): DETR's set criterion is
  matched against these augmented targets instead of the bare ground truth;
- the hard pseudo-label baseline (what autodistill-style tools do): a plain DETR trained on them.

Per image (boxes normalised cxcywh, classes in the student's order, C = number of classes):

1. each teacher prediction gets a hard label, the argmax over the C object classes (no-object
   excluded), and a score, that class's probability;
2. it is kept when its score ≥ ``threshold`` and the image is **not** complete for its class
   (its target's ``complete``; a target without one is complete for every class, so nothing is
   added to it): the ground truth is the authority on the classes it annotates;
3. duplicates among the kept ones are removed class by class with
   ``torchvision.ops.batched_nms`` (IoU > ``iou_threshold`` with a higher-scored box of its class);
4. so is any kept box overlapping (IoU > ``iou_threshold``) a ground-truth box of its class (an
   image may carry some annotations of a class it is not complete for);
5. the result is every ground-truth annotation followed by the kept predictions in decreasing score.

The teachers' soft predictions come as the cache stores them (per teacher ``(B, Q_t, C_t + 1)``
logits in its own class order and ``(B, Q_t, 4)`` boxes); :func:`teacher_predictions` pads them into
the student's label space as task-level amalgamation does (:func:`kacli.losses.task.pad_teacher_probs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert, box_iou

from kacli.losses.partial import complete_mask
from kacli.losses.task import pad_teacher_probs


def teacher_predictions(
    teacher_logits: Sequence[Tensor],
    teacher_boxes: Sequence[Tensor],
    class_index: Sequence[Tensor | Sequence[int]],
    num_classes: int,
) -> tuple[Tensor, Tensor]:
    """All teachers' predictions of each image in the student's label space.

    Args:
        teacher_logits: per teacher ``(B, Q_t, C_t + 1)``, last entry no object.
        teacher_boxes: per teacher ``(B, Q_t, 4)`` normalised cxcywh.
        class_index: per teacher ``(C_t,)``, the student class of each of its classes.
        num_classes: C.

    Returns:
        ``probs (B, ΣQ_t, C + 1)`` (softmax at T = 1, zeros at the other teachers' classes) and
        ``boxes (B, ΣQ_t, 4)``, teacher after teacher.
    """
    if not (len(teacher_logits) == len(teacher_boxes) == len(class_index)) or not teacher_logits:
        raise ValueError(f"{len(teacher_logits)} teacher logits, {len(teacher_boxes)} teacher boxes, "
                         f"{len(class_index)} class indices: need one of each per teacher")
    probs = torch.cat([pad_teacher_probs(lg.detach(), idx, num_classes)
                       for lg, idx in zip(teacher_logits, class_index)], dim=1)
    boxes = torch.cat([b.detach().float() for b in teacher_boxes], dim=1)
    return probs, boxes


def hard_labels(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``probs (…, C + 1)`` → ``(labels (…) int64, scores (…))``: argmax over the C object classes."""
    scores, labels = probs[..., :-1].max(dim=-1)
    return labels, scores


def augment_targets(
    targets: Sequence[dict],
    teacher_boxes: Sequence[Tensor],
    teacher_probs: Sequence[Tensor] | None = None,
    *,
    teacher_labels: Sequence[Tensor] | None = None,
    teacher_scores: Sequence[Tensor] | None = None,
    num_classes: int | None = None,
    threshold: float = 0.5,
    iou_threshold: float = 0.7,
) -> list[dict]:
    """Each image's ground truth plus the teachers' confident predictions of the classes it lacks.

    Args:
        targets: B dicts with ``labels (M,)``, ``boxes (M, 4)`` and optionally ``complete (C,)``
            bool; other keys are passed through.
        teacher_boxes: per image ``(K, 4)`` normalised cxcywh (a ``(B, K, 4)`` tensor will do).
        teacher_probs: per image ``(K, C + 1)`` class probabilities in the student's order; or
        teacher_labels, teacher_scores: per image ``(K,)`` hard labels and their scores.
        num_classes: C; needed only with labels and scores when a target has a ``complete``.
        threshold: predictions scoring below it are dropped.
        iou_threshold: class-wise NMS threshold among the added boxes, and against the ground truth.

    Returns:
        B new dicts: the target's keys, with ``labels (M + P,)`` and ``boxes (M + P, 4)`` — the
        ground truth first, then the P added predictions by decreasing score — and
        ``pseudo (M + P,)`` bool, True at the added ones. The inputs are not modified.
    """
    if (teacher_probs is None) == (teacher_labels is None):
        raise ValueError("give the teachers' class probabilities or their labels and scores (one of the two)")
    if teacher_labels is not None and teacher_scores is None:
        raise ValueError("teacher labels need their scores")
    if len(teacher_boxes) != len(targets):
        raise ValueError(f"{len(targets)} targets but teacher boxes for {len(teacher_boxes)} images")
    out = []
    for b, t in enumerate(targets):
        gt_labels, gt_boxes = t["labels"], t["boxes"]
        device = gt_boxes.device
        boxes = teacher_boxes[b].to(device).float().reshape(-1, 4)
        if teacher_probs is not None:
            probs = teacher_probs[b].to(device)
            labels, scores = hard_labels(probs)
            c = probs.shape[-1] - 1
        else:
            labels, scores = teacher_labels[b].to(device).long(), teacher_scores[b].to(device).float()
            c = num_classes
        if not (len(labels) == len(scores) == len(boxes)):
            raise ValueError(f"image {b}: {len(boxes)} teacher boxes, {len(labels)} labels, {len(scores)} scores")
        if t.get("complete") is None:
            missing = torch.zeros(len(labels), dtype=torch.bool, device=device)
        else:
            if c is None:
                raise ValueError("num_classes is needed to read the targets' 'complete' with hard teacher labels")
            missing = ~complete_mask(t, c, device)[labels]
        keep = torch.nonzero((scores >= threshold) & missing).flatten()
        xyxy = box_convert(boxes[keep], "cxcywh", "xyxy")
        nms = batched_nms(xyxy, scores[keep].float(), labels[keep], iou_threshold)  # by decreasing score
        keep, xyxy = keep[nms], xyxy[nms]
        if len(keep) and len(gt_labels):
            overlap = box_iou(xyxy, box_convert(gt_boxes.float(), "cxcywh", "xyxy"))
            same = labels[keep][:, None] == gt_labels.to(device)[None, :]
            keep = keep[~((overlap > iou_threshold) & same).any(dim=1)]
        new = dict(t)
        new["labels"] = torch.cat([gt_labels, labels[keep].to(gt_labels.dtype)])
        new["boxes"] = torch.cat([gt_boxes, boxes[keep].to(gt_boxes.dtype)])
        new["pseudo"] = torch.cat([torch.zeros(len(gt_labels), dtype=torch.bool, device=device),
                                   torch.ones(len(keep), dtype=torch.bool, device=device)])
        out.append(new)
    return out


def hard_pseudo_targets(
    targets: Sequence[dict],
    teacher_logits: Sequence[Tensor],
    teacher_boxes: Sequence[Tensor],
    class_index: Sequence[Tensor | Sequence[int]],
    num_classes: int,
    threshold: float = 0.5,
    iou_threshold: float = 0.7,
) -> list[dict]:
    """:func:`augment_targets` from the teachers' cached outputs (see :func:`teacher_predictions`):
    per image, its ground truth plus the teachers' predictions scoring ≥ ``threshold`` of the
    classes it is not complete for, deduplicated by class-wise NMS at ``iou_threshold``."""
    probs, boxes = teacher_predictions(teacher_logits, teacher_boxes, class_index, num_classes)
    if probs.shape[0] != len(targets):
        raise ValueError(f"teachers cover {probs.shape[0]} images, the targets {len(targets)}")
    return augment_targets(targets, boxes, probs, threshold=threshold, iou_threshold=iou_threshold)
