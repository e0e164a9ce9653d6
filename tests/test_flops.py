"""Parameter and multiply-add counts against counts made by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kacli.eval.flops import count_parameters, gflops


class LinearConvAttention(nn.Module):
    """A Linear, a Conv2d and a scaled_dot_product_attention, each with a countable cost."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 8)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)

    def forward(self, x, image, q, k, v):
        return self.linear(x), self.conv(image), F.scaled_dot_product_attention(q, k, v)


def test_macs_of_linear_conv_and_attention_by_hand():
    m = LinearConvAttention()
    x = torch.randn(2, 5, 16)  # 10 rows through a 16→8 Linear
    image = torch.randn(2, 3, 8, 8)  # 3→4 channels, 3×3 kernel, 8×8 output
    q = torch.randn(2, 2, 5, 4)  # batch 2, 2 heads, 5 queries, dim 4
    k = torch.randn(2, 2, 7, 4)  # 7 keys
    v = torch.randn(2, 2, 7, 6)  # value dim 6
    linear = 10 * 16 * 8
    conv = 2 * 4 * 8 * 8 * (3 * 3 * 3)
    attention = 2 * 2 * (5 * 7 * 4 + 5 * 7 * 6)  # scores Q·Kᵀ, then weights·V
    expected = linear + conv + attention
    g = gflops(m, (x, image, q, k, v))
    assert g["macs"] == expected
    assert g["gflops_mac"] == pytest.approx(expected / 1e9)
    assert g["gflops"] == pytest.approx(2 * expected / 1e9)
    assert "multiply-adds" in g["convention"]


def test_transformer_layer_inference_fast_path_is_counted():
    """nn.TransformerEncoderLayer (batch_first) takes a fused fast path in eval mode that the
    counter cannot see; the count must still be the layer's matrix products."""
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    layer.train()
    tokens, seq, d = 2 * 6, 6, 32
    expected = (
        tokens * d * 3 * d  # q, k, v projections
        + 2 * 2 * (seq * seq * d)  # batch 2 × (scores, weighted values); the heads split d
        + tokens * d * d  # output projection
        + tokens * d * 64 * 2  # feed-forward up and down
    )
    g = gflops(layer, (torch.randn(2, seq, d),))
    assert g["macs"] == expected
    assert layer.training  # mode restored
    assert torch.backends.mha.get_fastpath_enabled()  # switch restored


def test_count_parameters():
    m = LinearConvAttention()
    assert count_parameters(m) == (16 * 8 + 8) + (4 * 3 * 3 * 3 + 4)
    shared = nn.Sequential(m.linear, m.linear)
    assert count_parameters(shared) == 16 * 8 + 8
    frozen = nn.BatchNorm2d(4)
    frozen.requires_grad_(False)
    assert count_parameters(frozen) == 8  # weight and bias; running statistics are buffers
