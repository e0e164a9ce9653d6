"""DETR's set criterion: match queries to objects, then classification and box losses.

For predictions matched by :class:`HungarianMatcher` (and all others labelled "no object"):

- ``loss_ce``: cross-entropy over K+1 classes, class weights 1 and ``eos_coef`` for "no object",
  averaged as ``F.cross_entropy`` with weights does (Σ w_i·ce_i / Σ w_i over all queries);
- ``loss_bbox``: Σ over matched pairs of the L1 distance of the cxcywh boxes / num_boxes;
- ``loss_giou``: Σ over matched pairs of (1 − GIoU) / num_boxes;

where num_boxes is the number of target boxes in the batch (averaged over processes under
torch.distributed, at least 1). Each auxiliary decoder output gets the same losses with suffix
``_<i>``; ``total`` is the weighted sum of all of them. ``class_error`` (100 − top-1 accuracy of
the matched queries, in %; 0 when there are no targets) is a diagnostic, not part of ``total``.

Partial labels (``mask_incomplete=True``): each image's logits of the classes it is not complete
for (its target's ``complete``, see :mod:`kacli.losses.partial`) are set to −inf before anything
else, so for that image the cross-entropy of every query — matched or "no object" — is taken over
its valid classes and "no object" only, and the matcher's class cost −p_i(c_j) uses the
probabilities of that same masked softmax (the cost then ranks queries by the probability the loss
will raise). Class weights stay 1 and ``eos_coef``, and the mean is over all queries as before.
With every image complete for every class this is exactly the unmasked criterion.

Marginal partial labels (``marginal=True``, implies the masking): matched queries and the matching
are as above, but an unmatched query of an image that leaves classes out is taught "no object or
one of the classes left out": its term is −log(p_∅ + Σ_{c left out} p_c), p the softmax over all
K+1 logits (the partial-label marginal likelihood), so it no longer pushes down a class nobody
labelled on that image. It enters the weighted mean with the weight ``eos_coef`` of its "no object"
target, as its cross-entropy did: loss_ce = (Σ_matched ce_i + eos_coef·Σ_unmatched m_i) /
(#matched + eos_coef·#unmatched) over the batch (see :func:`kacli.losses.partial.marginal_logits`).
On an image complete for every class m_i is the "no object" cross-entropy, bit for bit.

Sigmoid classifiers (``focal=True``, Conditional DETR; ``pred_logits (B,Q,K)``, no "no object"):
``loss_ce`` is the sigmoid focal loss (α 0.25, γ 2; torchvision's ``sigmoid_focal_loss``) of every
query and class against the one-hot target (all zeros for a query matched to no object), summed
and divided by num_boxes, as Conditional DETR does; the matcher takes the focal cost
(:func:`kacli.losses.matcher.focal_cost`). Partial labels: a class an image is not complete for
(and has no annotation of) contributes no focal term on that image, neither positive nor
negative; with independent sigmoids there is no "no object" to share, so ``marginal`` is the same
as ``mask``. :func:`detection_criterion` gives either kind with its paper's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from kacli.errors import KacliError
from kacli.losses.matcher import HungarianMatcher
from kacli.losses.partial import marginal_logits, mask_logits, valid_classes
from kacli.runtime import rank_mean_count

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
# Conditional DETR's (and Deformable DETR's) weights for a sigmoid focal classifier; its matcher's
# costs are the same numbers.
FOCAL_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def _base_name(key: str) -> str:
    """``loss_ce_3`` → ``loss_ce``."""
    head, _, tail = key.rpartition("_")
    return head if tail.isdigit() else key


def num_boxes_across_ranks(targets: list[dict], device: torch.device) -> float:
    """Target boxes in the batch, averaged over torch.distributed ranks when initialised, ≥ 1."""
    return float(rank_mean_count(sum(len(t["labels"]) for t in targets), device).item())


class SetCriterion(nn.Module):
    """``forward(outputs, targets) → dict`` of losses (see the module docstring).

    Args:
        num_classes: K; class index K is "no object".
        matcher: a :class:`HungarianMatcher`.
        weight_dict: weight per base loss name (``loss_ce``, ``loss_bbox``, ``loss_giou``); applied to
            the auxiliary ``_<i>`` losses too. Names missing here weigh 0.
        eos_coef: class weight of "no object" in the cross-entropy.
        mask_incomplete: leave out of each image's softmax (loss and matching) the classes its
            target's ``complete`` (C,) bool marks as not annotated (see the module docstring).
        marginal: as ``mask_incomplete``, and an unmatched query's target is "no object or a class
            left out" (the marginal likelihood; see the module docstring).
        focal: the model's classifier is a sigmoid per class (``pred_logits (B,Q,K)``): focal loss
            (see the module docstring); ``eos_coef`` is then unused.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict | None = None,
                 eos_coef: float = 0.1, mask_incomplete: bool = False, marginal: bool = False,
                 focal: bool = False):
        super().__init__()
        weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        unknown = sorted(k for k in weight_dict if k not in LOSS_NAMES)
        if unknown:
            raise KacliError(f"unknown loss weight(s) {', '.join(unknown)} (known: {', '.join(LOSS_NAMES)})")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.mask_incomplete = bool(mask_incomplete or marginal)
        self.marginal = bool(marginal) and not focal
        self.focal = bool(focal)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _check_targets(self, targets: list[dict]) -> None:
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]) if targets else torch.zeros(0)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise KacliError(
                f"target label out of range [0, {self.num_classes}): found {int(labels.min())}..{int(labels.max())}"
            )

    def single(self, outputs: dict, targets: list[dict], num_boxes: float,
               indices: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The three losses (and ``class_error``) for one set of predictions.

        ``valid``: (B, K+1) bool, the classes each image's softmax keeps (:func:`valid_classes`);
        None keeps all. The matcher then sees the masked logits too."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        expected = self.num_classes if self.focal else self.num_classes + 1
        if logits.shape[-1] != expected:
            raise ValueError(f"pred_logits have {logits.shape[-1]} classes, expected {expected} "
                             f"({'sigmoid' if self.focal else 'softmax'} classifier)")
        full = logits
        if valid is not None and not self.focal:
            logits = mask_logits(logits.float(), valid)
            outputs = {"pred_logits": logits, "pred_boxes": boxes}
        if indices is None:
            indices = self.matcher(outputs, targets)
        dev = logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(dev)
        src_idx = torch.cat([src for src, _ in indices]).to(dev)
        tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]).to(dev)
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(dev)

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=dev)
        target_classes[batch_idx, src_idx] = tgt_labels
        if self.focal:
            loss_ce = self.focal_loss(logits, target_classes, num_boxes, valid)
        else:
            class_logits = logits.float()
            if self.marginal and valid is not None:
                class_logits = marginal_logits(full.float(), valid, target_classes == self.num_classes)
            loss_ce = F.cross_entropy(
                class_logits.transpose(1, 2), target_classes, weight=self.empty_weight.to(dev)
            )

        src_boxes = boxes[batch_idx, src_idx].float()
        tgt_boxes = tgt_boxes.float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = (
            generalized_box_iou_loss(
                box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum"
            )
            / num_boxes
        )
        with torch.no_grad():
            if len(tgt_labels):
                acc = (logits[batch_idx, src_idx].argmax(-1) == tgt_labels).float().mean()
                class_error = 100.0 * (1.0 - acc)
            else:
                class_error = torch.zeros((), device=dev)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "class_error": class_error}

    def focal_loss(self, logits: torch.Tensor, target_classes: torch.Tensor, num_boxes: float,
                   valid: torch.Tensor | None) -> torch.Tensor:
        """Σ focal(σ(logits), one-hot targets) / num_boxes: logits (B,Q,K), target_classes (B,Q)
        (K = no object: all zeros); ``valid`` (B,K+1) leaves an image's other classes out."""
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(torch.float32)
        loss = sigmoid_focal_loss(logits.float(), onehot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="none")  # (B,Q,K)
        if valid is not None:
            loss = loss * valid[:, None, :-1].to(loss.dtype)
        return loss.sum() / num_boxes

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs: ``pred_logits (B,Q,K+1)`` (``(B,Q,K)`` with ``focal``), ``pred_boxes (B,Q,4)``, optional ``aux_outputs``;
        targets: B dicts with ``boxes (M,4)`` cxcywh normalised and ``labels (M,)`` int64 (and,
        read only with ``mask_incomplete`` or ``marginal``, ``complete (K,)`` bool).

        Returns ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``loss_<name>_<i>`` per auxiliary
        output i, ``class_error`` and ``total`` (scalars)."""
        self._check_targets(targets)
        num_boxes = num_boxes_across_ranks(targets, outputs["pred_logits"].device)
        valid = None
        if self.mask_incomplete:
            valid = valid_classes(targets, self.num_classes, outputs["pred_logits"].device)
        losses = self.single(outputs, targets, num_boxes, valid=valid)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            for k, v in self.single(aux, targets, num_boxes, valid=valid).items():
                if k != "class_error":
                    losses[f"{k}_{i}"] = v
        losses["total"] = sum(
            self.weight_dict.get(_base_name(k), 0.0) * v for k, v in losses.items() if k.startswith("loss_")
        )
        return losses


def detection_criterion(num_classes: int, classifier: str = "softmax", eos_coef: float = 0.1,
                        mask_incomplete: bool = False, marginal: bool = False) -> SetCriterion:
    """The set criterion of a ``softmax`` (DETR: cross-entropy, class cost 1, weights
    :data:`DEFAULT_WEIGHTS`) or ``sigmoid`` classifier (Conditional DETR: focal loss, focal class
    cost 2, weights :data:`FOCAL_WEIGHTS`)."""
    if classifier == "sigmoid":
        matcher = HungarianMatcher(FOCAL_WEIGHTS["loss_ce"], FOCAL_WEIGHTS["loss_bbox"], FOCAL_WEIGHTS["loss_giou"],
                                   focal=True, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)
        return SetCriterion(num_classes, matcher, FOCAL_WEIGHTS, eos_coef, mask_incomplete, marginal, focal=True)
    if classifier != "softmax":
        raise ValueError(f"unknown classifier {classifier!r} (softmax or sigmoid)")
    return SetCriterion(num_classes, HungarianMatcher(), DEFAULT_WEIGHTS, eos_coef, mask_incomplete, marginal)
