"""One inference path: the size a checkpoint is evaluated at, and image → model → post-processing.

``kacli eval`` (and validation during training), ``kacli predict`` and the demo's prediction
pictures all go through it, so a checkpoint sees the same input and gives the same boxes in each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kacli.data.transforms import AugConfig, apply_view, eval_view
from kacli.limits import check_side
from kacli.models.postprocess import postprocess


def eval_sizes(ckpt: dict[str, Any], size: int | None = None, max_size: int | None = None) -> tuple[int, int]:
    """``(size, max_size)`` a checkpoint is evaluated at: the shorter side and the cap on the longer
    one. ``size`` / ``max_size`` when given (the caller checked them), else the checkpoint's run
    config (``aug.eval_size`` / ``aug.max_size``, checked against the side limit), else
    :class:`~kacli.data.transforms.AugConfig`'s defaults (DETR's 800 / 1333)."""
    cfg = ckpt.get("config") or {}
    aug = cfg.get("aug") if isinstance(cfg, dict) else None
    aug = aug if isinstance(aug, dict) else {}
    default = AugConfig()
    if size is None:
        size = aug.get("eval_size") or default.eval_size
        check_side("the checkpoint's aug.eval_size", size, ckpt.get("path"))
    if max_size is None:
        max_size = aug.get("max_size") or default.max_size
        check_side("the checkpoint's aug.max_size", max_size, ckpt.get("path"))
    return int(size), int(max_size)


@torch.inference_mode()
def detect_batch(model: nn.Module, images: torch.Tensor, mask: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
    """A padded batch of evaluation views (``images`` (B,3,H,W), ``mask`` (B,H,W) True = padding)
    → per image ``scores (Q,)``, ``labels (Q,)`` (class indices) and ``boxes (Q,4)`` pixel xyxy in
    its original ``orig_sizes`` (B,2) ``(h, w)`` image, unclipped (DETR's post-processing; a
    sigmoid classifier's top 100 (query, class) pairs, :mod:`kacli.models.postprocess`)."""
    return postprocess(model(images, mask), orig_sizes, model.classifier)


@torch.inference_mode()
def detect_image(model: nn.Module, image: torch.Tensor, size: int, max_size: int, device: torch.device) -> dict:
    """One uint8 image (3,H,W) through its evaluation view → ``scores (Q,)``, ``labels (Q,)``
    (class indices), ``boxes (Q,4)`` pixel xyxy in the original image, clipped to it, and
    ``unclipped (Q,4)`` the same before clipping (what ``kacli eval`` and DETR's own
    post-processing report)."""
    H, W = int(image.shape[1]), int(image.shape[2])
    img, _, _ = apply_view(image, torch.zeros(0, 4), eval_view(H, W, size, max_size))
    mask = torch.zeros(1, img.shape[1], img.shape[2], dtype=torch.bool, device=device)
    res = detect_batch(model, img[None].to(device), mask, torch.tensor([[H, W]], device=device))[0]
    unclipped = res["boxes"].cpu()
    boxes = unclipped.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    return {"scores": res["scores"].cpu(), "labels": res["labels"].cpu(), "boxes": boxes, "unclipped": unclipped}


__all__ = ["detect_batch", "detect_image", "eval_sizes"]
