"""Turn DETR outputs into scored, labelled boxes in pixels."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """outputs ``pred_logits (B,Q,K+1)``, ``pred_boxes (B,Q,4)`` cxcywh in [0,1]; target_sizes (B,2) [h, w].

    Each query's score is its highest class probability after a softmax over K+1 classes, the
    "no object" class excluded; its label is that class (an index into the model's label map).

    Returns one dict per image: ``scores (Q,)``, ``labels (Q,) int64``, ``boxes (Q,4)`` pixel xyxy
    in the coordinates of ``target_sizes``.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if len(logits) != len(target_sizes):
        raise ValueError(f"{len(logits)} predictions but {len(target_sizes)} target sizes")
    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    h, w = target_sizes.to(xyxy).unbind(-1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=-1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
