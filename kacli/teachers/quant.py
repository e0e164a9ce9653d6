"""int8 storage of the teachers' sequences: symmetric, one scale per token per layer.

A token row ``x`` (d values) is stored as ``q = round(x / s)`` in ``[-127, 127]`` (int8) with
``s = max|x| / 127`` rounded up to a float16 (one float16 step at most above it: 2^-10 relative for
``max|x| >= 0.008``, 2^-24 absolute below; the scale costs 2 bytes, and rounding it up keeps
``|x| / s <= 127``, so no value is clipped); it reads back as ``q · s``, within
``s / 2`` of ``x`` in every channel. An all-zero row has ``s = 0`` and ``q = 0`` and reads back as
zeros (no division by zero, no NaN). A row holding a non-finite value, or one whose ``max|x|``
exceeds float16's range times 127 (about 8.3e6), gets a non-finite scale, which
``cache-info --verify`` and the reader report, as they report non-finite float16 values.
Caches written before the scales were float16 hold float32 ones and read the same way.

The sequences travel as int8 from the file to the device where the student trains (half the bytes
of float16 through the DataLoader and the host-to-device copy); :func:`dequantize_teacher` turns
them into float tensors there, right before the losses.
"""

from __future__ import annotations

import torch

QMAX = 127
SCALE_DTYPE = torch.float16  # the stored scales' dtype


def round_up_half(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 ``x`` → the smallest float16 (:data:`SCALE_DTYPE`) ``>= x`` (inf beyond float16's range).

    Works on any device: a float16 rounded down is moved to the next one by adding 1 to its bit
    pattern (for non-negative finite float16 values the patterns are ordered as the values)."""
    h = x.to(SCALE_DTYPE)
    low = h.to(torch.float32) < x
    return torch.where(low, (h.view(torch.int16) + 1).view(SCALE_DTYPE), h)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., d) float → ``(q (..., d) int8, scale (...) float16)`` with ``x ≈ q · scale[..., None]``."""
    x = x.float()
    scale = round_up_half(x.abs().amax(dim=-1) / QMAX)
    s = scale.to(torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` (..., d) int8 and ``scale`` (...) float16 or float32 → ``q · scale[..., None]`` (..., d) in ``dtype``."""
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


__all__ = ["QMAX", "SCALE_DTYPE", "round_up_half", "quantize_int8", "dequantize", "dequantize_teacher"]
