"""Hungarian matching of DETR's queries to ground-truth objects (one query per object).

Cost of assigning query i to target j (DETR's):
``cost_class · (−p_i(c_j)) + cost_bbox · ‖b_i − b_j‖₁ + cost_giou · (−GIoU(b_i, b_j))``,
with p_i the softmax over the K+1 classes and boxes normalised cxcywh (GIoU on their xyxy form).
With a sigmoid classifier (``focal=True``, Conditional DETR) the class term is the focal cost of
p = σ(logit of c_j): ``α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p))`` (α 0.25, γ 2), the focal loss's
change when that class becomes the query's target.
The optimal assignment per image comes from ``scipy.optimize.linear_sum_assignment`` on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Class cost of a sigmoid classifier: ``logits (...)`` of the target classes → ``(...)``
    ``α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p))``, p = σ(logits) (logs computed stably)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * -F.logsigmoid(logits)
    neg = (1 - alpha) * p**gamma * -F.logsigmoid(-logits)
    return pos - neg


class HungarianMatcher(nn.Module):
    """``forward(outputs, targets) → [(src_idx, tgt_idx)]`` per image, int64 tensors of equal
    length min(Q, M): query ``src_idx[k]`` is matched to target ``tgt_idx[k]``; ``src_idx`` ascending.

    ``outputs``: ``pred_logits (B,Q,K+1)``, ``pred_boxes (B,Q,4)``. ``targets``: list of B dicts with
    ``labels (M,) int64`` and ``boxes (M,4)`` normalised cxcywh (M may be 0).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.focal, self.alpha, self.gamma = bool(focal), float(alpha), float(gamma)
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """The matching cost per image: a list of B CPU tensors (Q, M_b)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if len(sizes) != B:
            raise ValueError(f"{B} predictions but {len(sizes)} targets")
        if sum(sizes) == 0:
            return [logits.new_zeros((Q, 0), dtype=torch.float32).cpu() for _ in sizes]
        # All images at once (one transfer to CPU), then keep each image's own block.
        out_boxes = boxes.flatten(0, 1).float()
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(out_boxes)
        if self.focal:
            cost = self.cost_class * focal_cost(logits.flatten(0, 1).float()[:, tgt_labels], self.alpha, self.gamma)
        else:
            prob = logits.flatten(0, 1).float().softmax(-1)  # (B·Q, K+1)
            cost = -self.cost_class * prob[:, tgt_labels]
        cost = cost + self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
        cost = cost - self.cost_giou * generalized_box_iou(
            box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        cost = cost.view(B, Q, -1).cpu()
        return [c[b] for b, c in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        matches = []
        for c in self.cost_matrices(outputs, targets):
            if c.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            if not torch.isfinite(c).all():
                raise FloatingPointError("matching cost is not finite (the model's outputs hold NaN or inf)")
            i, j = linear_sum_assignment(c.numpy())
            matches.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return matches
