"""DETR's transformer, batch-first: multi-head attention, encoder and decoder layers (pre-/post-norm).

Parameter names and shapes follow facebookresearch/detr (which uses ``nn.MultiheadAttention``):
``self_attn.in_proj_weight (3d,d)``, ``self_attn.in_proj_bias (3d,)``, ``self_attn.out_proj.*``,
``multihead_attn.*`` (decoder cross-attention), ``linear1``, ``linear2``, ``norm1..3``, and
``encoder.norm`` (pre-norm only) / ``decoder.norm``. A DETR checkpoint's transformer loads as is.

Positional encodings are added to queries and keys only, never to values, in every attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _merge_masks(
    key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Combine the masks into one SDPA mask (4-D, broadcastable to (B,h,L,S)).

    Returns ``(mask, dead)``: ``mask`` is bool *allowed* or float additive, ``dead`` (…,L,1) marks
    query rows that may attend to nothing. Those rows are opened up here (to avoid NaN) and their
    attention result is zeroed by the caller.
    """
    kpm = None if key_padding_mask is None else key_padding_mask[:, None, None, :].to(torch.bool)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        elif attn_mask.dim() != 4:
            raise ValueError(
                f"attn_mask must be (L,S) or 4-D broadcastable to (B,h,L,S), got shape {tuple(attn_mask.shape)}"
            )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        add = attn_mask.to(dtype)
        if kpm is not None:
            add = torch.where(kpm, float("-inf"), add)
        dead = torch.isneginf(add).all(dim=-1, keepdim=True)
        return torch.where(dead, 0.0, add), dead
    if kpm is None and attn_mask is None:
        return None, None
    if kpm is None:
        blocked = attn_mask
    elif attn_mask is None:
        blocked = kpm
    else:
        blocked = kpm | attn_mask
    dead = blocked.all(dim=-1, keepdim=True)
    return ~blocked | dead, dead


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nheads: int, key_padding_mask: torch.Tensor | None = None,
           attn_mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Multi-head scaled dot-product attention of projected inputs: q (B,L,Dq), k (B,S,Dq),
    v (B,S,Dv) → (B,L,Dv); heads split the last axis (Dq and Dv may differ), masks as in
    :class:`MultiheadAttention`. A query row that may attend to no key gets 0, never NaN."""
    B, L, dq = q.shape
    S, dv = k.shape[1], v.shape[-1]
    q = q.view(B, L, nheads, dq // nheads).transpose(1, 2)
    k = k.view(B, S, nheads, dq // nheads).transpose(1, 2)
    v = v.view(B, S, nheads, dv // nheads).transpose(1, 2)
    mask, dead = _merge_masks(key_padding_mask, attn_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B,h,L,Dv/h)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out.transpose(1, 2).reshape(B, L, dv)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout, batch-first,
    computed with ``F.scaled_dot_product_attention``.

    Masks follow ``nn.MultiheadAttention``: ``key_padding_mask (B,S)`` bool, True = padding (ignored
    key); ``attn_mask`` either bool (True = *not* allowed) or float (added to the logits, −inf
    blocks), shaped (L,S) or 4-D broadcastable to (B,h,L,S). A query row that may attend to no key
    at all gets a zero attention result (so its output is ``out_proj.bias``), never NaN.
    """

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nheads:
            raise ValueError("d_model must be divisible by nheads")
        self.d_model = d_model
        self.nheads = nheads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B,L,d), key (B,S,d), value (B,S,d) → (B,L,d)."""
        d = query.shape[-1]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key:  # self-attention with the same positional encoding: one matmul for q and k
            q, k = F.linear(query, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        out = attend(q, k, v, self.nheads, key_padding_mask, attn_mask, self.dropout if self.training else 0.0)
        return self.out_proj(out)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR's box head: ``layers.{0,1,2}``; Conditional DETR's
    ``query_scale`` and ``ref_point_head``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN (ReLU), each with a residual connection, pre- or post-norm."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src, pos=None, key_padding_mask=None, attn_mask=None):
        """src (B,n,d), pos (B,n,d), key_padding_mask (B,n) True=pad → (B,n,d)."""
        if self.pre_norm:
            x = self.norm1(src)
            qk = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask, attn_mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, key_padding_mask, attn_mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN; pre- or post-norm."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        """tgt (B,Q,d), memory (B,S,d), memory_key_padding_mask (B,S), pos (B,S,d), query_pos (B,Q,d) → (B,Q,d)."""
        mem_k = _with_pos(memory, pos)
        if self.pre_norm:
            x = self.norm1(tgt)
            qk = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(
                self.multihead_attn(_with_pos(x, query_pos), mem_k, memory, memory_key_padding_mask)
            )
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        qk = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)))
        tgt = self.norm2(
            tgt + self.dropout2(self.multihead_attn(_with_pos(tgt, query_pos), mem_k, memory, memory_key_padding_mask))
        )
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers that returns every layer's output.

    ``norm`` (pre-norm models only, as in DETR) is applied to the last layer's output.
    """

    def __init__(self, num_layers: int, d_model: int, nheads: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nheads, dim_feedforward, dropout, pre_norm) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre_norm else None

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """src (B,n,d), pos (B,n,d), key_padding_mask (B,n) True=pad, attn_mask (n,n) or (B|1,h|1,n,n).

        Returns a list of ``num_layers`` tensors (B,n,d): entry i is layer i's output (the residual
        stream after layer i). With pre-norm the last entry is ``norm(last layer's output)`` — the
        memory the decoder reads; earlier entries are not normalised. With post-norm every layer
        ends in its own LayerNorm and the last entry is the memory as well.
        """
        outs = []
        x = src
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask, attn_mask)
            outs.append(x)
        if self.norm is not None:
            outs[-1] = self.norm(outs[-1])
        return outs


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; every layer's output goes through the final ``norm``."""

    def __init__(self, num_layers: int, d_model: int, nheads: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nheads, dim_feedforward, dropout, pre_norm) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor | None,
                pos: torch.Tensor | None, query_pos: torch.Tensor | None) -> torch.Tensor:
        """tgt (B,Q,d), memory (B,S,d), memory_key_padding_mask (B,S), pos (B,S,d), query_pos (B,Q,d)
        → (L_dec,B,Q,d): ``norm(output of layer i)`` for each layer i (DETR's return_intermediate)."""
        outs = []
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask, pos, query_pos)
            outs.append(self.norm(x))
        return torch.stack(outs)


class Transformer(nn.Module):
    """Encoder + decoder, initialised as DETR does (Xavier-uniform on every matrix).

    ``decoder`` replaces DETR's decoder (Conditional DETR's, :mod:`kacli.models.conditional`); it is
    initialised the same way."""

    def __init__(self, d_model: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False,
                 decoder: nn.Module | None = None):
        super().__init__()
        self.d_model = d_model
        self.nheads = nheads
        self.encoder = TransformerEncoder(enc_layers, d_model, nheads, dim_feedforward, dropout, pre_norm)
        self.decoder = decoder if decoder is not None else TransformerDecoder(
            dec_layers, d_model, nheads, dim_feedforward, dropout, pre_norm)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
