"""Turn DETR outputs into scored, labelled boxes in pixels.

A softmax classifier (DETR) gives one detection per query: its highest class probability, "no
object" excluded. A sigmoid classifier (Conditional DETR) gives the ``top_k`` (100) highest
(query, class) probabilities over all Q × K pairs, as Conditional DETR's post-processing does: a
query may then appear with several classes.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

TOP_K = 100


def class_scores(logits: torch.Tensor, classifier: str = "softmax", top_k: int = TOP_K
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits (B,Q,K+1)`` (softmax) or ``(B,Q,K)`` (sigmoid) → ``scores (B,D)``, ``labels (B,D)``
    class indices and ``query (B,D)`` the query of each detection; D = Q (softmax) or
    min(top_k, Q·K) (sigmoid, scores descending)."""
    if classifier == "sigmoid":
        prob = logits.float().sigmoid()  # (B, Q, K)
        B, Q, K = prob.shape
        scores, flat = prob.flatten(1).topk(min(top_k, Q * K), dim=1)
        return scores, flat % K, torch.div(flat, K, rounding_mode="floor")
    if classifier != "softmax":
        raise ValueError(f"unknown classifier {classifier!r} (softmax or sigmoid)")
    scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
    query = torch.arange(logits.shape[1], device=logits.device).expand_as(labels)
    return scores, labels, query


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: torch.Tensor, classifier: str = "softmax") -> list[dict[str, torch.Tensor]]:
    """outputs ``pred_logits (B,Q,K+1)`` (sigmoid classifier: ``(B,Q,K)``), ``pred_boxes (B,Q,4)``
    cxcywh in [0,1]; target_sizes (B,2) [h, w].

    Returns one dict per image (see the module docstring for which detections): ``scores (D,)``,
    ``labels (D,) int64`` (indices into the model's label map), ``boxes (D,4)`` pixel xyxy in the
    coordinates of ``target_sizes``.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if len(logits) != len(target_sizes):
        raise ValueError(f"{len(logits)} predictions but {len(target_sizes)} target sizes")
    scores, labels, query = class_scores(logits, classifier)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
    h, w = target_sizes.to(xyxy).unbind(-1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=-1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
