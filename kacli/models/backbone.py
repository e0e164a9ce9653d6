"""CNN backbones: torchvision ResNets as DETR uses them, and a tiny CNN for CPU runs.

Both map ``images (B,3,H,W), mask (B,H,W)`` to ``feat (B,C,h,w), mask (B,h,w)`` and expose
``num_channels`` (C) and ``stride`` (H/h). Nothing is ever downloaded: ResNets are built with
``weights=None`` and pretrained weights come only from a file the user names
(:func:`load_backbone_weights`).

ResNet parameters live under ``body.<torchvision name>`` (``body.conv1.weight``,
``body.layer4.2.bn3.running_var``, ...), so facebookresearch/detr's ``backbone.0.body.*`` keys
map to ours by dropping the ``0.``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from kacli.errors import KacliError
from kacli.fsutil import require_file
from kacli.models.config import ModelConfig
from kacli.grid import token_grid
from kacli.models.torchfile import torch_load_untrusted

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def backbone_stride(cfg: ModelConfig) -> int:
    """Feature-map stride (H/h) of the backbone ``cfg`` names: the tiny CNN 16; a ResNet 32, or 16
    with a dilated last stage. Known without building the backbone (its ``stride`` attribute)."""
    return _stride(cfg.backbone, cfg.dilation)


def _stride(name: str, dilation: bool) -> int:
    if name == "tiny":
        return 16
    return 16 if dilation else 32


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Padding mask (B,H,W) bool, True = padding at the bottom/right → (B,h,w) bool.

    Image b's valid feature region is ``ceil(h_b / stride) × ceil(w_b / stride)`` at the top-left:
    exactly the feature-map size the backbone gives that image alone (every stride-2 stage with
    padding rounds up). Unlike DETR's nearest interpolation of the mask, this does not depend on how
    much the batch pads, so the token count of an image is the same in any batch — the teacher cache
    stores each image's valid tokens and the student's batch must find the same ones.
    """
    h, w = size[0], size[1]  # not int(): sizes stay symbolic under torch.jit.trace and ONNX export
    valid = ~mask
    vh = valid.any(dim=2).sum(dim=1)
    vw = valid.any(dim=1).sum(dim=1)
    fh, fw = token_grid(vh, vw, stride)
    fh, fw = fh.clamp(max=h), fw.clamp(max=w)
    rows = torch.arange(h, device=mask.device)
    cols = torch.arange(w, device=mask.device)
    return (rows[None, :, None] >= fh[:, None, None]) | (cols[None, None, :] >= fw[:, None, None])


class ResNetBackbone(nn.Module):
    """A torchvision ResNet up to ``layer4`` with frozen BatchNorm statistics and affine.

    As in DETR, the stem (conv1) and ``layer1`` are frozen (``requires_grad=False``); layer2–4
    train. With ``dilation`` the last stage uses dilated convolutions: stride 16 instead of 32.
    """

    def __init__(self, name: str, dilation: bool = False):
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}")
        net = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        for pname, p in self.body.named_parameters():
            if not pname.startswith(("layer2.", "layer3.", "layer4.")):
                p.requires_grad_(False)
        self.num_channels = RESNET_CHANNELS[name]
        self.stride = _stride(name, dilation)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,H,W), mask (B,H,W) True=pad → feat (B,C,h,w), mask (B,h,w)."""
        feat = self.body(images)
        return feat, downsample_mask(mask, feat.shape[-2:], self.stride)


class TinyBackbone(nn.Module):
    """Four stride-2 stages of conv3x3 (no bias) → BatchNorm → ReLU; stride 16, all trainable.

    With a 3×3 kernel, padding 1 and stride 2, an output row i reads input rows 2i−1..2i+1, so
    for images whose sides are multiples of 16 the features of the image region never see the
    batch's bottom/right padding: a padded batch gives the same features as each image alone
    (in eval mode).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128)):
        super().__init__()
        stages = []
        cin = 3
        for w in widths:
            stages.append(
                nn.Sequential(nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True))
            )
            cin = w
        self.body = nn.Sequential(*stages)
        self.num_channels = widths[-1]
        self.stride = _stride("tiny", False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,H,W), mask (B,H,W) True=pad → feat (B,C,h,w), mask (B,h,w)."""
        feat = self.body(images)
        return feat, downsample_mask(mask, feat.shape[-2:], self.stride)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone ``cfg`` names, randomly initialised (never downloads)."""
    if cfg.backbone == "tiny":
        return TinyBackbone(tuple(cfg.tiny_widths))
    return ResNetBackbone(cfg.backbone, cfg.dilation)


# Key prefixes a backbone state dict may carry, tried in this order:
# facebookresearch/detr / UP-DETR, a kacli DETR state dict, a bare backbone module.
_PREFIXES = ("backbone.0.body.", "backbone.body.", "body.")


def _read_weights_file(path: Path) -> Any:
    return torch_load_untrusted(path, "weights")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load backbone weights from a file the user names.

    Accepts a plain torchvision ResNet ``state_dict`` (``conv1.weight``, ``layer1.0.bn1.*``, the
    ``fc.*`` classifier is ignored), a facebookresearch/detr or UP-DETR checkpoint (``{"model": ...}``
    with ``backbone.0.body.*`` keys), or a kacli DETR state dict (``backbone.body.*``). BatchNorm's
    ``num_batches_tracked`` is ignored (FrozenBatchNorm2d has none).

    Returns:
        ``{"loaded": int, "missing": [keys of the backbone not in the file],
        "unexpected": [file keys the backbone lacks], "ignored": [keys deliberately skipped]}``.

    Raises:
        KacliError: the file is unreadable, not a state dict, holds no backbone weights, or holds
        tensors whose shapes do not fit (e.g. resnet50 weights for a resnet18).
    """
    p = require_file(path, "backbone weights file")
    data = _read_weights_file(p)
    if isinstance(data, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(data.get(wrapper), Mapping):
                data = data[wrapper]
                break
    if not isinstance(data, Mapping) or not data or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise KacliError("not a state dict (expected a mapping of parameter names to tensors)", p)

    if all(k.startswith("module.") for k in data):  # saved from DataParallel / DDP
        data = {k[len("module."):]: v for k, v in data.items()}
    state: dict[str, torch.Tensor] = {}
    for prefix in _PREFIXES:
        picked = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
        if picked:
            state = picked
            break
    else:
        state = dict(data)

    ignored = sorted(k for k in state if k.startswith("fc.") or k.endswith("num_batches_tracked"))
    state = {k: v for k, v in state.items() if k not in set(ignored)}

    own = backbone.body.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    matching = {k: v for k, v in state.items() if k in own}
    if not matching:
        raise KacliError(
            f"no weights for this backbone in the file (it has e.g. {', '.join(sorted(data)[:3])})", p
        )
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matching.items() if v.shape != own[k].shape]
    if wrong:
        raise KacliError(
            f"{len(wrong)} tensor(s) do not fit this backbone (another architecture?): {'; '.join(wrong[:3])}", p
        )
    backbone.body.load_state_dict(matching, strict=False)
    return {"loaded": len(matching), "missing": missing, "unexpected": unexpected, "ignored": ignored}
