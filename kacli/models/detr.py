"""DETR: backbone → 1×1 input projection → transformer encoder → decoder → class and box heads.

Parameter names mirror facebookresearch/detr, so importing its checkpoints is a key rename:

    ours                                   facebookresearch/detr
    backbone.body.<resnet name>            backbone.0.body.<resnet name>   (the only difference)
    input_proj.{weight,bias}               same
    transformer.encoder.layers.i.*         same (self_attn.in_proj_weight/in_proj_bias/out_proj, linear1/2, norm1/2)
    transformer.encoder.norm.*             same (pre-norm models only)
    transformer.decoder.layers.i.*         same (self_attn, multihead_attn, linear1/2, norm1/2/3)
    transformer.decoder.norm.*             same
    query_embed.weight, class_embed.*, bbox_embed.layers.{0,1,2}.*   same

The positional encoding has no parameters (DETR's ``backbone.1``). Tensors are batch-first
(DETR's transformer is sequence-first internally; the weights are the same).

With ``cfg.arch == "conditional"`` the decoder is Conditional DETR's
(:mod:`kacli.models.conditional`; parameter names as in Atten4Vis/ConditionalDETR), the class head
has K outputs (a sigmoid each, bias initialised to the prior 0.01 as in focal-loss detectors) and
the boxes are offsets from each query's reference point: ``sigmoid(bbox_embed(h) + [σ⁻¹(s), 0, 0])``.

The forward pass is split into pieces the extended student reuses: :meth:`backbone_features`,
:meth:`positional`, the encoder (``self.transformer.encoder``) and :meth:`decode`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kacli.models.backbone import build_backbone
from kacli.models.conditional import ConditionalDecoder, inverse_sigmoid
from kacli.models.config import ModelConfig
from kacli.models.position import PositionEmbeddingSine
from kacli.models.transformer import MLP, Transformer


class DETR(nn.Module):
    """DETR detector for ``num_classes`` classes: ``cfg.classifier`` ``softmax`` (+ one "no object"
    class at index ``num_classes``) or ``sigmoid`` (Conditional DETR: K independent classes)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        cfg.validate()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.cfg = cfg
        self.num_classes = num_classes
        d = cfg.d_model
        self.backbone = build_backbone(cfg)
        self.position = PositionEmbeddingSine(d // 2)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.transformer = Transformer(
            d_model=d,
            nheads=cfg.nheads,
            enc_layers=cfg.enc_layers,
            dec_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            pre_norm=cfg.pre_norm,
            decoder=ConditionalDecoder(cfg.dec_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm)
            if cfg.arch == "conditional" else None,
        )
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.bbox_embed = MLP(d, d, 4, 3)
        if cfg.classifier == "sigmoid":
            # K classes, no "no object"; every class starts at the prior probability 0.01, and the
            # boxes at their reference points (Conditional DETR's initialisation)
            self.class_embed = nn.Linear(d, num_classes)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        else:
            # K classes, "no object", then cfg.unnamed_classes slots folded into "no object" (decode)
            self.class_embed = nn.Linear(d, num_classes + 1 + cfg.unnamed_classes)

    @property
    def classifier(self) -> str:
        """``softmax`` (``pred_logits`` (…, K+1), the last "no object") or ``sigmoid`` ((…, K))."""
        return self.cfg.classifier

    # -- pieces -------------------------------------------------------------------------------

    def backbone_features(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,H,W) normalised, mask (B,H,W) True=pad → feat (B,C,h,w), mask (B,h,w).

        ``feat`` is the backbone's output before the input projection."""
        return self.backbone(images, mask)

    def positional(self, mask: torch.Tensor) -> torch.Tensor:
        """Feature-map mask (B,h,w) → sine positional encoding (B,n,d), tokens row-major."""
        return self.position(mask).flatten(1, 2)

    @staticmethod
    def flatten(feat: torch.Tensor) -> torch.Tensor:
        """(B,d,h,w) → (B,n,d), n = h·w, row-major (token index = row·w + col)."""
        return feat.flatten(2).transpose(1, 2)

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, memory_pos: torch.Tensor | None) -> dict:
        """memory (B,S,d), memory_mask (B,S) True=pad, memory_pos (B,S,d) → predictions.

        Returns ``pred_logits (B,Q,K+1)`` (sigmoid classifier: ``(B,Q,K)``), ``pred_boxes (B,Q,4)``
        (cxcywh in [0,1]) from the last decoder layer and ``aux_outputs``: one ``{pred_logits,
        pred_boxes}`` per earlier decoder layer when ``cfg.aux_loss``, else an empty list.
        """
        B = memory.shape[0]
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        if self.cfg.arch == "conditional":
            hs, reference = self.transformer.decoder(tgt, memory, memory_mask, memory_pos, query_pos)  # (L,B,Q,d)
            offset = self.bbox_embed(hs)
            anchor = F.pad(inverse_sigmoid(reference), (0, 2))  # (B,Q,4): centre from the point, size 0
            boxes = (offset + anchor.to(offset.dtype)).sigmoid()
            logits = self.class_embed(hs)
        else:
            hs = self.transformer.decoder(tgt, memory, memory_mask, memory_pos, query_pos)  # (L,B,Q,d)
            logits = self.class_logits(hs)
            boxes = self.bbox_embed(hs).sigmoid()
        aux = (
            [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])] if self.cfg.aux_loss else []
        )
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}

    def class_logits(self, hs: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., d) → logits (..., K+1).

        With ``cfg.unnamed_classes`` = E > 0 the head has K+1+E outputs (an imported checkpoint's
        slots that name no category come last); "no object" becomes the logsumexp of itself and
        those E, so a softmax over the K+1 gives every named class exactly the probability the
        original head's softmax over all K+1+E gives it, and the unnamed slots are never predicted.
        """
        logits = self.class_embed(hs)
        if logits.shape[-1] == self.num_classes + 1:
            return logits
        named, rest = logits[..., : self.num_classes], logits[..., self.num_classes :]
        return torch.cat([named, rest.logsumexp(-1, keepdim=True)], dim=-1)

    # -- whole model --------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        """images (B,3,H,W), mask (B,H,W) True=pad → dict:

        - ``pred_logits`` (B,Q,K+1), ``pred_boxes`` (B,Q,4) cxcywh in [0,1], ``aux_outputs`` (see :meth:`decode`);
        - ``enc_proj`` (B,n,d): the projected input sequence (input_proj output, flattened);
        - ``enc_layers``: list of (B,n,d), one per encoder layer (see ``TransformerEncoder.forward``);
          the last one is the decoder's memory;
        - ``enc_mask`` (B,n) True=pad; ``enc_hw`` (h, w) of the feature map.
        """
        feat, fmask = self.backbone_features(images, mask)
        h, w = feat.shape[-2:]
        src = self.flatten(self.input_proj(feat))
        pos = self.positional(fmask)
        tok_mask = fmask.flatten(1)
        enc = self.transformer.encoder(src, pos, tok_mask)
        out = self.decode(enc[-1], tok_mask, pos)
        out.update(enc_proj=src, enc_layers=enc, enc_mask=tok_mask, enc_hw=(h, w))
        return out
