"""Conditional DETR's decoder (Meng et al., ICCV 2021, arXiv 2108.06152): conditional cross-attention.

DETR's backbone, input projection and encoder stay as they are; only the decoder differs:

- Every query has a reference point ``s = sigmoid(ref_point_head(query_pos))`` ``(B, Q, 2)`` (x, y),
  the same for every layer.
- Cross-attention: the query is the concatenation, per head, of the content query
  ``ca_qcontent_proj(x)`` and the conditional spatial query ``ca_qpos_sine_proj(λ_q ⊙ PE(s))``;
  the key is the concatenation of ``ca_kcontent_proj(memory)`` and ``ca_kpos_proj(PE(key))``; the
  value ``ca_v_proj(memory)``. ``PE(s)`` is the sine encoding of the point with the encoder's
  frequencies (:func:`point_sine_embedding`), ``λ_q = query_scale(x)`` (an MLP of the decoder
  embedding), 1 in the first layer. The first layer also adds ``ca_qpos_proj(query_pos)`` to the
  content query and the key position to the content key (as DETR does).
- Self-attention has separate content and position projections for q and k (``sa_*_proj``).
- Attention has no input projection of its own (the projections above are it); each head's
  query/key width is 2·d/h, its value width d/h; the scale is (2·d/h)^-1/2.
- Boxes are offsets from the reference point in inverse-sigmoid space (:class:`kacli.models.detr.DETR`).

Parameter names follow the official code (Atten4Vis/ConditionalDETR): ``sa_qcontent_proj``,
``sa_qpos_proj``, ``sa_kcontent_proj``, ``sa_kpos_proj``, ``sa_v_proj``, ``self_attn.out_proj``,
``ca_qcontent_proj``, ``ca_qpos_proj`` (first layer only), ``ca_kcontent_proj``, ``ca_kpos_proj``,
``ca_v_proj``, ``ca_qpos_sine_proj``, ``cross_attn.out_proj``, ``linear1/2``, ``norm1..3``, and the
decoder's ``query_scale``, ``ref_point_head`` and ``norm``. Tensors are batch-first. The official
layer is post-norm; ``pre_norm`` puts each LayerNorm before its sub-layer instead (kacli's ``tiny``
models are pre-norm), the decoder's final ``norm`` closing every layer's output in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kacli.models.transformer import MLP, attend


def point_sine_embedding(points: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """Reference points ``(..., 2)`` (x, y) in [0, 1] → ``(..., d_model)`` sine encoding.

    The encoder's encoding of a position (:class:`kacli.models.position.PositionEmbeddingSine`):
    each coordinate scaled by 2π, ``d_model/2`` features per axis (sin, cos interleaved at
    frequencies ``T^(2j/(d/2))``), y first, then x.
    """
    half = d_model // 2
    j = torch.arange(half, dtype=torch.float32, device=points.device)
    freq = temperature ** (2 * (j // 2) / half)

    def encode(v: torch.Tensor) -> torch.Tensor:
        a = v[..., None] * (2 * math.pi) / freq  # (..., half)
        return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), dim=-1).flatten(-2)

    pts = points.float()
    return torch.cat((encode(pts[..., 1]), encode(pts[..., 0])), dim=-1)


class _OutProj(nn.Module):
    """The attention's output projection, named ``<attn>.out_proj`` as in the official code."""

    def __init__(self, d_model: int):
        super().__init__()
        self.out_proj = nn.Linear(d_model, d_model)


class ConditionalDecoderLayer(nn.Module):
    """Self-attention, conditional cross-attention, FFN (see the module docstring)."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool,
                 first: bool):
        super().__init__()
        lin = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent_proj, self.sa_qpos_proj, self.sa_kcontent_proj = lin(), lin(), lin()
        self.sa_kpos_proj, self.sa_v_proj = lin(), lin()
        self.self_attn = _OutProj(d_model)
        self.ca_qcontent_proj = lin()
        self.ca_qpos_proj = lin() if first else None
        self.ca_kcontent_proj, self.ca_kpos_proj, self.ca_v_proj = lin(), lin(), lin()
        self.ca_qpos_sine_proj = lin()
        self.cross_attn = _OutProj(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = dropout
        self.nheads = nheads
        self.pre_norm = pre_norm

    def _self_attention(self, x: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = self.sa_qcontent_proj(x) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(x) + self.sa_kpos_proj(query_pos)
        out = attend(q, k, self.sa_v_proj(x), self.nheads, None, None, self.attn_dropout if self.training else 0.0)
        return self.self_attn.out_proj(out)

    def _cross_attention(self, x, memory, memory_mask, pos, query_pos, query_sine) -> torch.Tensor:
        B, Q, d = x.shape
        S, h = memory.shape[1], self.nheads
        q = self.ca_qcontent_proj(x)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        sine = self.ca_qpos_sine_proj(query_sine)
        q = torch.cat([q.view(B, Q, h, d // h), sine.view(B, Q, h, d // h)], dim=-1).view(B, Q, 2 * d)
        k = torch.cat([k.view(B, S, h, d // h), k_pos.view(B, S, h, d // h)], dim=-1).view(B, S, 2 * d)
        out = attend(q, k, self.ca_v_proj(memory), h, memory_mask, None, self.attn_dropout if self.training else 0.0)
        return self.cross_attn.out_proj(out)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.drop(F.relu(self.linear1(x))))

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, query_sine):
        """tgt (B,Q,d), memory (B,S,d), memory_key_padding_mask (B,S) True=pad, pos (B,S,d),
        query_pos (B,Q,d), query_sine (B,Q,d) (λ_q ⊙ PE(s)) → (B,Q,d)."""
        if self.pre_norm:
            tgt = tgt + self.drop(self._self_attention(self.norm1(tgt), query_pos))
            tgt = tgt + self.drop(self._cross_attention(self.norm2(tgt), memory, memory_key_padding_mask, pos,
                                                        query_pos, query_sine))
            return tgt + self.drop(self._ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.drop(self._self_attention(tgt, query_pos)))
        tgt = self.norm2(tgt + self.drop(self._cross_attention(tgt, memory, memory_key_padding_mask, pos, query_pos,
                                                                query_sine)))
        return self.norm3(tgt + self.drop(self._ffn(tgt)))


class ConditionalDecoder(nn.Module):
    """The decoder stack: ``forward(...) → (hs (L,B,Q,d), reference (B,Q,2))``.

    ``hs[i]`` is ``norm(output of layer i)``; ``reference`` the queries' reference points (after
    the sigmoid), which every layer's boxes are offsets from."""

    def __init__(self, num_layers: int, d_model: int, nheads: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nheads, dim_feedforward, dropout, pre_norm, first=i == 0)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)
        self.d_model = d_model

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor | None,
                pos: torch.Tensor, query_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tgt (B,Q,d) (zeros), memory (B,S,d), memory_key_padding_mask (B,S), pos (B,S,d), query_pos (B,Q,d)."""
        reference = self.ref_point_head(query_pos).sigmoid()  # (B, Q, 2)
        sine = point_sine_embedding(reference, self.d_model).to(memory.dtype)
        outs = []
        x = tgt
        for i, layer in enumerate(self.layers):
            scale = 1.0 if i == 0 else self.query_scale(x)
            x = layer(x, memory, memory_key_padding_mask, pos, query_pos, sine * scale)
            outs.append(self.norm(x))
        return torch.stack(outs), reference


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 − x))`` with x clamped to [eps, 1 − eps]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


__all__ = ["ConditionalDecoder", "ConditionalDecoderLayer", "inverse_sigmoid", "point_sine_embedding"]
