"""The ground-truth loss of a student whose images are annotated only for some classes.

Modes (:data:`GT_LOSSES`):

- ``none``: DETR's set criterion on the ground truth as it is; an object of a class the image
  does not annotate is taught "no object" (the naive merge: missing = background).
- ``mask``: the criterion with each image's unannotated classes left out of its softmax, in the loss
  and in the matching cost (:class:`kacli.losses.criterion.SetCriterion` with ``mask_incomplete``).
- ``marginal``: as ``mask`` for the matched queries and the matching; a query matched to no object
  is taught "no object or one of the image's unannotated classes": −log(p_∅ + Σ_{c unannotated} p_c)
  over the full softmax (the partial-label marginal likelihood), weighted ``eos_coef`` as its
  "no object" cross-entropy is (``SetCriterion`` with ``marginal``).
- ``pseudo-gt``: the criterion matched against the ground truth plus the teachers' confident
  predictions of the classes the image lacks, as hard labels (:mod:`kacli.losses.pseudo`).

On images complete for every class (a single dataset) all four give the same losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kacli.losses.criterion import SetCriterion, detection_criterion
from kacli.losses.matcher import HungarianMatcher
from kacli.losses.pseudo import hard_pseudo_targets

GT_LOSSES = ("none", "mask", "marginal", "pseudo-gt")


class GroundTruthLoss(nn.Module):
    """``forward(outputs, targets, teacher=None) → dict``: :class:`SetCriterion`'s losses in one of
    the :data:`GT_LOSSES` modes.

    Args:
        num_classes: C, the student's class count.
        mode: ``none``, ``mask``, ``marginal`` or ``pseudo-gt`` (see the module docstring).
        class_index: per teacher ``(C_t,)`` student class indices (``pseudo-gt`` only).
        eos_coef, weight_dict, matcher: as for :class:`SetCriterion` (matcher default: DETR's costs).
        threshold: ``pseudo-gt``: teacher predictions scoring below it are not added.
        iou_threshold: ``pseudo-gt``: class-wise NMS threshold of the added boxes.
        classifier: the student's, ``softmax`` or ``sigmoid`` (focal loss; ``marginal`` is then
            ``mask``: see :mod:`kacli.losses.criterion`).

    ``targets``: B dicts with ``labels (M,)``, ``boxes (M, 4)`` normalised cxcywh and, on partially
    annotated data, ``complete (C,)`` bool (absent = complete for every class). ``teacher``
    (``pseudo-gt`` only): ``{"logits": [(B, Q_t, C_t + 1)], "boxes": [(B, Q_t, 4)]}`` as
    ``collate_cached`` batches them.
    """

    def __init__(
        self,
        num_classes: int,
        mode: str = "none",
        class_index: Sequence[Tensor | Sequence[int]] | None = None,
        eos_coef: float = 0.1,
        weight_dict: dict | None = None,
        matcher: HungarianMatcher | None = None,
        threshold: float = 0.5,
        iou_threshold: float = 0.7,
        classifier: str = "softmax",
    ):
        super().__init__()
        if mode not in GT_LOSSES:
            raise ValueError(f"unknown ground-truth loss {mode!r} (known: {', '.join(GT_LOSSES)})")
        if mode == "pseudo-gt" and not class_index:
            raise ValueError("the pseudo-gt ground-truth loss needs the teachers' class indices")
        self.mode = mode
        self.num_classes = num_classes
        self.class_index = [torch.as_tensor(c, dtype=torch.long) for c in (class_index or [])]
        self.threshold = float(threshold)
        self.iou_threshold = float(iou_threshold)
        if matcher is None and weight_dict is None:
            self.criterion = detection_criterion(num_classes, classifier, eos_coef, mask_incomplete=mode == "mask",
                                                 marginal=mode == "marginal")
        else:
            self.criterion = SetCriterion(num_classes, matcher or HungarianMatcher(), weight_dict, eos_coef,
                                          mask_incomplete=mode == "mask", marginal=mode == "marginal",
                                          focal=classifier == "sigmoid")

    @property
    def needs_teacher(self) -> bool:
        """Whether ``forward`` reads the teachers' predictions."""
        return self.mode == "pseudo-gt"

    def targets_for(self, targets: list[dict], teacher: dict | None = None) -> list[dict]:
        """The targets the criterion is matched against: the ground truth, or for ``pseudo-gt`` the
        ground truth plus the teachers' confident predictions of the missing classes."""
        if self.mode != "pseudo-gt":
            return targets
        if teacher is None:
            raise ValueError("the pseudo-gt ground-truth loss needs the teachers' predictions")
        return hard_pseudo_targets(targets, teacher["logits"], teacher["boxes"], self.class_index, self.num_classes,
                                   self.threshold, self.iou_threshold)

    def forward(self, outputs: dict, targets: list[dict], teacher: dict | None = None) -> dict[str, Tensor]:
        return self.criterion(outputs, self.targets_for(targets, teacher))
