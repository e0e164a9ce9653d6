"""A transformers object detector behind kacli's detector interface: kacli's views in, its named
classes' logits and boxes of each view out, and (single-scale encoders) its sequences on kacli's
token grid."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kacli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kacli.errors import KacliError
from kacli.grid import token_grid, top_left_index
from kacli.teachers.hf.rules import ImageRule
from kacli.teachers.labels import remap_logits


class TransformersDetector(nn.Module):
    """A transformers object detector behind kacli's detector interface (frozen, eval mode).

    ``forward(images (B,3,H,W), mask (B,H,W) True = padding)`` takes kacli's normalised views
    (ImageNet mean/std, each view at the top-left of the padded batch), puts each view through the
    folder's image rules (:class:`ImageRule`) and the model, and returns ``{"pred_logits" (B,Q,K+1)
    (softmax) or (B,Q,K) (sigmoid) float32, "pred_boxes" (B,Q,4) float32}``: cxcywh in [0,1] of
    each view (its unpadded extent), K the model's named slots (``named``, the label map's ids, in
    order). Unnamed slots (``N/A``) are never predicted: a softmax's fold into "no object"
    (:func:`kacli.teachers.labels.remap_logits`), so every named class keeps transformers' own
    probability; a sigmoid's are dropped. Views of the same resized size run as one batch.
    """

    def __init__(self, model: nn.Module, rule: ImageRule, classifier: str, num_labels: int, path: Path,
                 named: list[int] | None = None):
        super().__init__()
        self.model = model
        self.rule = rule
        self.classifier = classifier
        self.num_labels = int(num_labels)
        self.path = path
        self.keep_slots(named)
        self.stride: int | None = None  # give_sequences()
        self.aifi_layer: int | None = None  # give_sequences(): the kacli layer the AIFI output stands for
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        mean = rule.mean or (0.0, 0.0, 0.0)
        std = rule.std or (1.0, 1.0, 1.0)
        self.register_buffer("out_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("out_std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def keep_slots(self, slots: list[int] | None) -> None:
        """Give only these class slots, in this order (None: all of them)."""
        named = list(range(self.num_labels)) if slots is None else [int(k) for k in slots]
        self.named = None if named == list(range(self.num_labels)) else named

    def train(self, mode: bool = True) -> TransformersDetector:
        """Always eval mode: a teacher's dropout and batch statistics stay off."""
        return super().train(False)

    def model_input(self, view: torch.Tensor) -> torch.Tensor:
        """One kacli view (3,h,w), normalised with ImageNet's mean/std → the model's pixel values
        (3,h',w') by the folder's rules (at the view's own size when it gives sequences)."""
        x = view.float() * self.in_std + self.in_mean  # [0, 1] pixels
        h, w = int(x.shape[1]), int(x.shape[2])
        oh, ow = (h, w) if self.stride is not None else self.rule.output_size(h, w)
        if (oh, ow) != (h, w):
            x = F.interpolate(x[None], size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x * self.rule.scale
        if self.rule.mean is not None:
            x = (x - self.out_mean) / self.out_std
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        valid = ~mask.bool()
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for b in range(len(images)):
            h = int(valid[b].any(1).sum())
            w = int(valid[b].any(0).sum())
            x = self.model_input(images[b, :, :h, :w])
            groups.setdefault(tuple(x.shape[1:]), []).append((b, x))
        logits: list[torch.Tensor | None] = [None] * len(images)
        boxes: list[torch.Tensor | None] = [None] * len(images)
        seq = self.stride is not None
        if seq:  # kacli's token grid of the padded batch: each view's tokens at its top-left
            s = self.stride
            hp, wp = token_grid(images.shape[-2], images.shape[-1], s)
            layers: list[torch.Tensor] = []
            enc_mask = torch.ones(len(images), hp * wp, dtype=torch.bool, device=images.device)
        dtype = next(self.model.parameters()).dtype
        for (h, w), items in groups.items():
            pixel_values = torch.stack([x for _, x in items]).to(dtype)
            out = self.model(pixel_values=pixel_values, output_hidden_states=seq)
            lg, bx = out.logits.float(), out.pred_boxes.float()
            for k, (b, _) in enumerate(items):
                logits[b], boxes[b] = lg[k], bx[k]
            if seq:
                th, tw = token_grid(h, w, s)
                states = self._states(out.encoder_hidden_states)
                if self.aifi_layer is not None:  # the AIFI output only: the level's projection guides nothing
                    if len(states) != 2:
                        raise KacliError(f"the model's hybrid encoder gives {len(states)} sequences, expected 2 (the "
                                         "AIFI level's projection and output)", self.path)
                    states = states[1:]
                if states[0].shape[1] != th * tw:
                    raise KacliError(f"the model's encoder gives {states[0].shape[1]} tokens for a {h}x{w} view, "
                                     f"expected ceil(size / stride {s}) = {th}x{tw}", self.path)
                if not layers:
                    layers = [states[0].new_zeros(len(images), hp * wp, states[0].shape[-1]) for _ in states]
                idx = top_left_index(th, tw, wp, images.device)
                for k, (b, _) in enumerate(items):
                    for j, x in enumerate(states):
                        layers[j][b, idx] = x[k].to(layers[j].dtype)
                    enc_mask[b, idx] = False
        if len({tuple(x.shape) for x in logits}) > 1:  # type: ignore[union-attr]
            raise KacliError("the model gives a different number of queries for views of different sizes; kacli "
                             "needs a fixed query count", self.path)
        pred_logits = torch.stack(logits)  # type: ignore[arg-type]
        want = self.num_labels + (1 if self.classifier == "softmax" else 0)
        if pred_logits.shape[-1] != want:
            raise KacliError(f"the model gives {pred_logits.shape[-1]} class logits per query, expected {want} for its "
                             f"{self.num_labels} labels with a {self.classifier} classifier", self.path)
        if self.named is not None:
            pred_logits = (remap_logits(pred_logits, self.named) if self.classifier == "softmax"
                           else pred_logits[..., self.named])
        out = {"pred_logits": pred_logits, "pred_boxes": torch.stack(boxes)}  # type: ignore[arg-type]
        if seq:
            if self.aifi_layer is not None:  # the AIFI output stands for kacli's layer aifi_layer; the others are absent
                proj, enc_layers = None, [None] * (self.aifi_layer - 1) + layers
            else:
                proj, enc_layers = layers[0], layers[1:]
            out |= {"enc_proj": proj, "enc_layers": enc_layers, "enc_mask": enc_mask, "enc_hw": (hp, wp)}
        return out

    def _states(self, states) -> list[torch.Tensor]:
        """transformers' ``encoder_hidden_states`` → ``[(b, n, d)]``: a single-scale encoder's
        (L+1) sequences as they are (the projection, then each layer); an RT-DETR hybrid encoder's
        two stride-32 maps (b, d, h, w) — the level's input projection and the AIFI output —
        flattened row-major."""
        return [x.flatten(2).transpose(1, 2) if x.dim() == 4 else x for x in states]

    def give_sequences(self, stride: int | None, aifi_layer: int | None = None) -> None:
        """Run every view at its own size (the folder's resize rule left out, so that its tokens lie on
        kacli's grid) and give the encoder's sequences too, kacli's way: ``enc_proj`` (B,n,d),
        ``enc_layers`` [(B,n,d)] × L, ``enc_mask`` (B,n) True = padding, ``enc_hw`` (hp, wp) with
        ``hp = ceil(H / stride)``; None: predictions only, each view by the folder's rules.

        ``aifi_layer``: an RT-DETR hybrid encoder (:data:`kacli.teachers.hf.AIFI_FAMILIES`) gives its
        AIFI output F5 as encoder layer ``aifi_layer`` (the student's last); ``enc_proj`` is None and
        ``enc_layers`` holds None before it (the teacher has nothing kacli maps there: its level's
        input projection guiding the student's ``proj`` cost AP when measured, BENCHMARKS.md)."""
        self.stride = stride
        self.aifi_layer = None if stride is None else aifi_layer

    def encoder_layout(self) -> tuple[int, int, int]:
        """What the encoder gives, measured on a 64 × 128 image: ``(sequences, stride, width)`` —
        how many sequences (a single-scale encoder's L+1, a hybrid encoder's 2), the stride of the
        first (the tokens it has) and its width; stride 0 when they do not share one token grid
        (or there are none): no sequence kacli reads."""
        with torch.no_grad():
            out = self.model(pixel_values=torch.zeros(1, 3, 64, 128, dtype=next(self.model.parameters()).dtype),
                             output_hidden_states=True)
        states = self._states(out.encoder_hidden_states or ())
        if not states:
            return 0, 0, 0
        n, width = int(states[0].shape[1]), int(states[0].shape[-1])
        if any(tuple(x.shape[1:]) != (n, width) for x in states):
            return len(states), 0, width
        for s in (8, 16, 32, 64):
            th, tw = token_grid(64, 128, s)
            if th * tw == n:
                return len(states), s, width
        raise KacliError(f"the model's encoder gives {n} tokens for a 64x128 image: no stride of 8, 16, 32 or 64 "
                         "gives that", self.path)


__all__ = ["TransformersDetector"]
