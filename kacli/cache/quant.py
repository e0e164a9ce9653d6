"""int8 storage of the teachers' sequences: symmetric, one scale per token per layer.

A token row ``x`` (d values) is stored as ``q = round(x / s)`` in ``[-127, 127]`` (int8) with
``s = max|x| / 127`` (float32); it reads back as ``q · s``, within ``s / 2 = max|x| / 254`` of ``x``
in every channel. An all-zero row has ``s = 0`` and ``q = 0`` and reads back as zeros (no division
by zero, no NaN). A row holding a non-finite value gets a non-finite scale, which
``cache-info --verify`` reports, as it reports non-finite float16 values.

The sequences travel as int8 from the file to the device where the student trains (half the bytes
of float16 through the DataLoader and the host-to-device copy); :func:`dequantize_teacher` turns
them into float tensors there, right before the losses.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., d) float → ``(q (..., d) int8, scale (...) float32)`` with ``x ≈ q · scale[..., None]``."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` (..., d) int8 and ``scale`` (...) float32 → ``q · scale[..., None]`` (..., d) in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def dequantize_teacher(teacher: dict | None, dtype: torch.dtype = torch.float32) -> dict | None:
    """A batch's ``teacher`` dict with float sequences, on the device its tensors are on.

    ``collate_cached`` of an int8 cache read with ``dequantize=False`` carries ``seqs``
    (B, N, L, n, d) int8 and ``seq_scale`` (B, N, L, n) float32; this returns the dict with
    ``seqs`` = ``q · scale`` in ``dtype`` and no ``seq_scale``. Any other ``teacher`` (float
    sequences, or None) is returned as it is.
    """
    if teacher is None or "seq_scale" not in teacher:
        return teacher
    out = {k: v for k, v in teacher.items() if k != "seq_scale"}
    out["seqs"] = dequantize(teacher["seqs"], teacher["seq_scale"], dtype)
    return out


__all__ = ["QMAX", "quantize_int8", "dequantize", "dequantize_teacher"]
