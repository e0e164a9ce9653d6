"""Sine positional encoding of DETR ("Attention is all you need" generalised to images).

For each valid pixel, its row y and column x are counted from 1 over the unpadded region,
normalised by the valid height/width and scaled to (0, 2π]. Each axis gets ``num_pos_feats``
features: for j = 0 … num_pos_feats/2 − 1 the pair ``sin(y / T^(2j/F)), cos(y / T^(2j/F))``
(T = temperature, F = num_pos_feats), interleaved. The y features come first, then x.
Padded positions get the encoding of the valid region's last row/column or 0 (they are masked
out downstream).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """mask (B,h,w) bool True=pad → pos (B,h,w,2·num_pos_feats). No parameters."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError("num_pos_feats must be even (sin/cos pairs)")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)  # (B,h,w): 1-based row index inside the valid region
        x = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        half = self.num_pos_feats // 2
        j = torch.arange(half, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * j / self.num_pos_feats)

        def encode(v: torch.Tensor) -> torch.Tensor:
            a = v[..., None] / freq  # (B,h,w,half)
            return torch.stack((a.sin(), a.cos()), dim=-1).flatten(-2)  # sin, cos interleaved

        return torch.cat((encode(y), encode(x)), dim=-1)
