"""The DETR architecture as a dataclass, with named presets.

``model_config("tiny")`` or ``model_config({"preset": "tiny", "dec_layers": 2})`` gives a checked
:class:`ModelConfig`; unknown keys and out-of-range values are :class:`KacliError`. Checkpoints store
``cfg.to_dict()`` and rebuild with ``ModelConfig.from_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from kacli.errors import KacliError

BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101")
ARCHS = ("detr", "conditional")
# The classifier each architecture has: DETR a softmax over K classes + "no object", Conditional
# DETR a sigmoid per class (focal loss, no "no object" class).
CLASSIFIERS = {"detr": "softmax", "conditional": "sigmoid"}


@dataclass
class ModelConfig:
    """DETR architecture. Defaults are the paper's ``detr-r50``.

    Attributes:
        arch: ``detr`` (vanilla DETR: softmax classifier with "no object") or ``conditional``
            (Conditional DETR: conditional cross-attention, boxes relative to each query's
            reference point, per-class sigmoid classifier; :mod:`kacli.models.conditional`).
        backbone: ``tiny`` (4 stride-2 conv3x3-BN-ReLU stages, stride 16) or a torchvision ResNet.
        dilation: dilate the last ResNet stage (stride 16 instead of 32; DETR's "DC5"); resnet50/101 only.
        d_model: transformer width d.
        nheads: attention heads (d_model must be divisible by it).
        enc_layers / dec_layers: encoder / decoder depth (>= 1 each).
        dim_feedforward: hidden width of each layer's FFN.
        dropout: dropout in attention weights and FFN/residual branches.
        num_queries: object queries Q.
        pre_norm: LayerNorm before each sub-layer (DETR's ``normalize_before``).
        aux_loss: predict from every decoder layer (``aux_outputs``) for auxiliary losses.
        tiny_widths: channel widths of the tiny backbone's 4 stages (unused by ResNets).
        unnamed_classes: extra outputs of the class head after "no object": class slots of an
            imported checkpoint that name no category (COCO's 11 unused ids in DETR's 91). They stay
            in the softmax's normalisation, folded into "no object", and are never predicted
            (:meth:`kacli.models.detr.DETR.decode`). 0 for every model kacli trains.
    """

    arch: str = "detr"
    backbone: str = "resnet50"
    dilation: bool = False
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    pre_norm: bool = False
    aux_loss: bool = True
    tiny_widths: tuple[int, int, int, int] = field(default=(16, 32, 64, 128))
    unnamed_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able dict (``tiny_widths`` as a list; ``unnamed_classes`` only when not 0 and
        ``arch`` only when not ``detr``, so the architecture of every DETR model reads as before)."""
        d = dataclasses.asdict(self)
        d["tiny_widths"] = list(self.tiny_widths)
        if not self.unnamed_classes:
            d.pop("unnamed_classes")
        if self.arch == "detr":
            d.pop("arch")
        return d

    @property
    def classifier(self) -> str:
        """``softmax`` (K classes + "no object", DETR) or ``sigmoid`` (one per class, Conditional DETR)."""
        return CLASSIFIERS[self.arch]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path=None) -> "ModelConfig":
        """Build from a dict holding (a subset of) the fields; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise KacliError(f"model config must be a mapping, got {type(data).__name__}", path)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise KacliError(
                f"unknown model config key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})", path
            )
        values = dict(data)
        if "tiny_widths" in values and isinstance(values["tiny_widths"], (list, tuple)):
            values["tiny_widths"] = tuple(values["tiny_widths"])
        cfg = cls(**values)
        cfg.validate(path)
        return cfg

    def validate(self, path=None) -> "ModelConfig":
        """Check types and ranges; raise :class:`KacliError` naming the bad field."""

        def bad(msg):
            raise KacliError(f"model config: {msg}", path)

        if self.arch not in ARCHS:
            bad(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.backbone not in BACKBONES:
            bad(f"backbone {self.backbone!r} is not one of {', '.join(BACKBONES)}")
        for name in ("dilation", "pre_norm", "aux_loss"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        u = self.unnamed_classes
        if isinstance(u, bool) or not isinstance(u, int) or u < 0:
            bad(f"unnamed_classes must be a non-negative integer, got {u!r}")
        if u and self.arch != "detr":
            bad(f"unnamed_classes is for softmax classifiers (arch detr), not arch {self.arch!r}")
        if self.d_model % self.nheads:
            bad(f"d_model {self.d_model} is not divisible by nheads {self.nheads}")
        if self.d_model % 4:
            bad(f"d_model {self.d_model} must be a multiple of 4 (sine position features are sin/cos pairs per axis)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        w = self.tiny_widths
        if (
            not isinstance(w, tuple)
            or len(w) != 4
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in w)
        ):
            bad(f"tiny_widths must be 4 positive integers, got {w!r}")
        if self.dilation and self.backbone not in ("resnet50", "resnet101"):
            bad(f"dilation needs a bottleneck ResNet (resnet50 or resnet101), not {self.backbone!r}")
        return self


PRESETS: dict[str, ModelConfig] = {
    # The paper's teacher/student: DETR-R50, post-norm.
    "detr-r50": ModelConfig(),
    # For 2 CPU cores (measured in docs/DEMO.md): 0.47 M parameters, 4x4 tokens on the demo's
    # 64-px images; 5 queries for its 1-3 objects per image (fewer queries leave the
    # "everything is no-object" plateau sooner).
    "tiny": ModelConfig(
        backbone="tiny",
        dilation=False,
        d_model=64,
        nheads=4,
        enc_layers=3,
        dec_layers=3,
        dim_feedforward=256,
        dropout=0.0,
        num_queries=5,
        pre_norm=True,
        aux_loss=True,
        tiny_widths=(16, 32, 64, 128),
    ),
}
# Conditional DETR (arXiv 2108.06152): R50, 300 queries, post-norm, as the paper's 50-epoch models.
PRESETS["conditional-r50"] = dataclasses.replace(PRESETS["detr-r50"], arch="conditional", num_queries=300)
# The tiny model with Conditional DETR's decoder and classifier, for the demo's CPU scale.
PRESETS["tiny-conditional"] = dataclasses.replace(PRESETS["tiny"], arch="conditional")


def model_config(spec: str | Mapping[str, Any] | ModelConfig, path=None) -> ModelConfig:
    """A checked :class:`ModelConfig` from a preset name, a dict, or a ModelConfig.

    A dict may name a base preset with ``preset: NAME`` and override any field; without it the
    fields override ``detr-r50``'s. Unknown keys or preset names raise :class:`KacliError`.
    """
    if isinstance(spec, ModelConfig):
        return dataclasses.replace(spec).validate(path)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KacliError(f"unknown model preset {spec!r} (known: {', '.join(PRESETS)})", path)
        return dataclasses.replace(PRESETS[spec])
    if not isinstance(spec, Mapping):
        raise KacliError(f"model config must be a preset name or a mapping, got {type(spec).__name__}", path)
    values = dict(spec)
    base = values.pop("preset", "detr-r50")
    if base not in PRESETS:
        raise KacliError(f"unknown model preset {base!r} (known: {', '.join(PRESETS)})", path)
    merged = PRESETS[base].to_dict()
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise KacliError(
            f"unknown model config key(s) {', '.join(unknown)} (known: preset, {', '.join(sorted(names))})", path
        )
    merged.update(values)
    return ModelConfig.from_dict(merged, path)
