"""The token grid: the valid feature-map size of an image under a backbone of stride ``s``.

Every stride-2 stage with padding rounds up, so an ``h × w`` image gives ``ceil(h/s) × ceil(w/s)``
tokens. The backbone's padding mask, the teacher cache's per-entry grids and ``cache-info``'s
check all take it from here.
"""

from __future__ import annotations

from typing import Any


def ceil_div(n: Any, stride: int) -> Any:
    """``ceil(n / stride)`` of a size ``n >= 0``: an int for a number, element-wise for a numpy
    array or a torch tensor (kept a tensor: sizes stay symbolic under tracing and ONNX export)."""
    if hasattr(n, "div"):  # torch.Tensor
        return (n + stride - 1).div(stride, rounding_mode="floor")
    if hasattr(n, "shape") and getattr(n, "ndim", 0):  # numpy array
        return -(-n // stride)
    return -(-int(n) // stride)


def token_grid(height: Any, width: Any, stride: int) -> tuple[Any, Any]:
    """Valid feature-map size of a ``height × width`` image: ``(ceil(height/stride), ceil(width/stride))``."""
    return ceil_div(height, stride), ceil_div(width, stride)


def top_left_index(h: int, w: int, row: int, device: Any = None) -> Any:
    """(h·w,) int64 torch indices of an ``h × w`` grid's tokens, row-major, at the top-left of a
    flattened grid ``row`` tokens wide: where one entry's tokens go in a padded batch's grid."""
    import torch

    return (torch.arange(h, device=device)[:, None] * row + torch.arange(w, device=device)[None, :]).reshape(-1)


__all__ = ["ceil_div", "token_grid", "top_left_index"]
