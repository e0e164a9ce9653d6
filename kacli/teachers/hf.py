"""Teachers from other tools: a transformers ``save_pretrained`` folder of an object detector.

Any DETR-family detector transformers can load with ``AutoModelForObjectDetection`` (DETR,
Conditional, DAB, Deformable DETR, RT-DETR, RT-DETRv2, D-FINE, LW-DETR, RF-DETR, YOLOS, …) can
teach a kacli student through task-level amalgamation: all TA needs from a teacher is its class
scores and boxes per query. The model runs through transformers itself (nothing of its
architecture is copied here), frozen and in eval mode:

- the folder is read locally (``local_files_only``), never with ``trust_remote_code`` (a
  ``config.json`` with ``auto_map`` is refused), its weights only from ``model.safetensors``
  (the checkpoint format that runs no code), and weights that do not fit its ``config.json``
  (missing or wrongly shaped tensors) are refused rather than left random;
- each image goes through the folder's own image rules (``preprocessor_config.json``: resize rule,
  rescale, normalisation) — :class:`ImageRule` — starting from the kacli view the student sees, so
  its boxes (normalised cxcywh of its input, which covers the whole view) are in the student's view
  coordinates;
- its classes are ``config.id2label``; a slot without a name (``N/A``, DETR's unused COCO ids) is
  never matched nor predicted. Whether its classifier is a softmax with "no object" (DETR, YOLOS: ``num_labels + 1``
  logits) or per-class sigmoids (the others) is read from the family and checked against the logits.

:func:`is_transformers_folder` tells such a folder from a kacli checkpoint or run folder;
:func:`load_transformers_folder` loads one as a checkpoint-like dict (``kind: "transformers"``)
holding a :class:`TransformersDetector` — an ``nn.Module`` with kacli's detector interface, which
eval and predict score beside kacli's models (:func:`load_detector`, :func:`build_detector`).

A folder of a single-scale encoder family (:data:`SEQUENCE_FAMILIES`: DETR, Conditional, DAB-DETR)
teaches through SA too: :meth:`TransformersDetector.give_sequences` runs it on each view at the
view's own size and gives its encoder's sequences (transformers' ``encoder_hidden_states``: the
input projection's output, then every layer's) on kacli's token grid. The others give no sequence
the student is guided by: they teach through TA only (their part of sequence-level amalgamation is
off). DETR and Conditional DETR folders can also be converted with ``kacli import-checkpoint``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kacli.data.names import name_key, rename_keys, renamed
from kacli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from kacli.errors import KacliError
from kacli.fsutil import sha256_file
from kacli.models.checkpoint import build_model, load_checkpoint
from kacli.teachers.labels import remap_logits

KIND = "transformers"
INSTALL_HINT = "transformers is not installed: pip install 'kacli[hf]'"

#: The families kacli documents (model_type → (name, classifier)); any other object-detection
#: model_type transformers knows loads too, with the sigmoid classifier checked at its first run.
FAMILIES: dict[str, tuple[str, str]] = {
    "detr": ("DETR", "softmax"),
    "conditional_detr": ("Conditional DETR", "sigmoid"),
    "dab-detr": ("DAB-DETR", "sigmoid"),
    "deformable_detr": ("Deformable DETR", "sigmoid"),
    "rt_detr": ("RT-DETR", "sigmoid"),
    "rt_detr_v2": ("RT-DETRv2", "sigmoid"),
    "d_fine": ("D-FINE", "sigmoid"),
    "deimv2": ("DEIMv2", "sigmoid"),
    "lw_detr": ("LW-DETR", "sigmoid"),
    "rf_detr": ("RF-DETR", "sigmoid"),
    "yolos": ("YOLOS", "softmax"),
    "table-transformer": ("Table Transformer", "softmax"),
}

#: Families whose encoder is DETR's kind: one sequence at one stride, layer by layer
#: (``encoder_hidden_states``: the input projection's output, then every layer's). Such a folder
#: teaches through SA too, when its width, depth and stride are the kacli teachers'.
SEQUENCE_FAMILIES = ("detr", "conditional_detr", "dab-detr")

#: Slot names that mean "no class here" (DETR's unused COCO ids).
UNNAMED = ("N/A", "")

CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_transformers_folder(path: str | Path) -> bool:
    """A folder with a ``config.json`` and no kacli checkpoint (``best.pt`` / ``last.pt``) in it."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and not any((p / n).is_file() for n in ("best.pt", "last.pt"))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise KacliError(f"{what} is not readable JSON ({type(e).__name__})", path) from None
    if not isinstance(data, dict):
        raise KacliError(f"{what} is not a JSON object", path)
    return data


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    return transformers


def detection_model_types() -> set[str]:
    """The object-detection model types the installed transformers maps (empty without it)."""
    if _transformers() is None:
        return set()
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    return set(MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES)


# -- the image rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRule:
    """What the folder's image processor does to an image before the model sees it.

    ``size``: the resize rule, one of ``{"shortest_edge", "longest_edge"}`` (aspect kept, DETR's
    rule), ``{"longest_edge"}``, ``{"height", "width"}`` (stretched to exactly that), ``{"max_height",
    "max_width"}`` (aspect kept, fit inside), or None (no resize); ``scale``: what a [0, 1] pixel is
    multiplied by (``rescale_factor`` · 255 when the processor rescales, else 255); ``mean``/``std``:
    the normalisation after it (None: none).
    """

    size: tuple[tuple[str, int], ...] | None
    scale: float
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_processor(cls, data: Mapping[str, Any], path: Path) -> ImageRule:
        def number(key: str, default: float) -> float:
            v = data.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v == v) or abs(v) == float("inf"):
                raise KacliError(f"{key} is {v!r}, expected a number", path)
            return float(v)

        def triple(key: str, default) -> tuple[float, float, float]:
            v = data.get(key, default)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v] * 3
            if (not isinstance(v, (list, tuple)) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise KacliError(f"{key} is {v!r}, expected three numbers", path)
            if key == "image_std" and any(float(x) <= 0 for x in v):
                raise KacliError(f"{key} is {v!r}, expected positive numbers", path)
            return tuple(float(x) for x in v)  # type: ignore[return-value]

        size = None
        if data.get("do_resize", True):
            raw = data.get("size")
            if not isinstance(raw, dict):
                raise KacliError(f"size is {raw!r}; expected e.g. {{\"shortest_edge\": 800, \"longest_edge\": 1333}} "
                                 "or {\"height\": 640, \"width\": 640}", path)
            raw = {k: v for k, v in raw.items() if v is not None}
            known = ({"shortest_edge", "longest_edge"}, {"longest_edge"}, {"height", "width"}, {"max_height", "max_width"},
                     {"shortest_edge"})
            if set(raw) not in known or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192
                                                for v in raw.values()):
                raise KacliError(f"size {raw!r} is not a resize rule kacli knows (shortest_edge[/longest_edge], "
                                 "longest_edge, height/width or max_height/max_width, in pixels up to 8192)", path)
            size = tuple(sorted((str(k), int(v)) for k, v in raw.items()))
        scale = number("rescale_factor", 1 / 255) * 255.0 if data.get("do_rescale", True) else 255.0
        if data.get("do_normalize", True):
            mean, std = triple("image_mean", IMAGENET_MEAN), triple("image_std", IMAGENET_STD)
        else:
            mean = std = None
        return cls(size, scale, mean, std)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` an ``h × w`` image is resized to (transformers' rules)."""
        if self.size is None:
            return h, w
        s = dict(self.size)
        if "height" in s:
            return s["height"], s["width"]
        if "shortest_edge" in s:
            return resized_size(h, w, s["shortest_edge"], s.get("longest_edge"))
        if "longest_edge" in s:
            r = s["longest_edge"] / max(h, w)
            return max(1, int(round(h * r))), max(1, int(round(w * r)))
        r = min(s["max_height"] / h, s["max_width"] / w)
        return max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))

    def eval_sizes(self) -> tuple[int, int] | None:
        """``(size, max_size)`` of kacli's evaluation view (``eval`` and ``predict`` resize an image to
        it before the model's own rule): the rule's own sides, so that an image the rule keeps is
        resized once; None without a resize rule (kacli's defaults)."""
        s = dict(self.size or ())
        if "shortest_edge" in s:
            return s["shortest_edge"], s.get("longest_edge", 1333)
        if "height" in s:
            return min(s["height"], s["width"]), max(s["height"], s["width"])
        if "max_height" in s:
            return min(s["max_height"], s["max_width"]), max(s["max_height"], s["max_width"])
        if "longest_edge" in s:
            return s["longest_edge"], s["longest_edge"]
        return None

    def to_dict(self) -> dict:
        return {"size": dict(self.size) if self.size else None, "scale": self.scale,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}


# -- the model as kacli runs it --------------------------------------------------------------------


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
            hp, wp = -(-images.shape[-2] // s), -(-images.shape[-1] // s)
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
                th, tw = -(-h // s), -(-w // s)
                states = out.encoder_hidden_states  # (L+1) × (b, n, d): the projection, then each layer
                if states[0].shape[1] != th * tw:
                    raise KacliError(f"the model's encoder gives {states[0].shape[1]} tokens for a {h}x{w} view, "
                                     f"expected ceil(size / stride {s}) = {th}x{tw}", self.path)
                if not layers:
                    layers = [states[0].new_zeros(len(images), hp * wp, states[0].shape[-1]) for _ in states]
                idx = (torch.arange(th, device=images.device)[:, None] * wp
                       + torch.arange(tw, device=images.device)[None, :]).reshape(-1)
                for k, (b, _) in enumerate(items):
                    for j, x in enumerate(states):
                        layers[j][b, idx] = x[k].to(layers[j].dtype)
                    enc_mask[b, idx] = False
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
            out |= {"enc_proj": layers[0], "enc_layers": layers[1:], "enc_mask": enc_mask, "enc_hw": (hp, wp)}
        return out

    def give_sequences(self, stride: int | None) -> None:
        """Run every view at its own size (the folder's resize rule left out, so that its tokens lie on
        kacli's grid) and give the encoder's sequences too, kacli's way: ``enc_proj`` (B,n,d),
        ``enc_layers`` [(B,n,d)] × L, ``enc_mask`` (B,n) True = padding, ``enc_hw`` (hp, wp) with
        ``hp = ceil(H / stride)``; None: predictions only, each view by the folder's rules."""
        self.stride = stride

    def encoder_stride(self) -> int:
        """The stride of the encoder's sequence, measured: the tokens a 64 × 128 image gives."""
        with torch.no_grad():
            out = self.model(pixel_values=torch.zeros(1, 3, 64, 128, dtype=next(self.model.parameters()).dtype),
                             output_hidden_states=True)
        n = int(out.encoder_hidden_states[0].shape[1])
        for s in (8, 16, 32, 64):
            if (-(-64 // s)) * (-(-128 // s)) == n:
                return s
        raise KacliError(f"the model's encoder gives {n} tokens for a 64x128 image: no stride of 8, 16, 32 or 64 "
                         "gives that", self.path)


# -- the folder ------------------------------------------------------------------------------------


def folder_sha256(path: str | Path) -> str:
    """sha256 over the folder's config, image rules and weight files (name and content each)."""
    p = Path(path)
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(p)
                   if n in (CONFIG, PROCESSOR) or (n.startswith("model") and n.endswith((".safetensors", ".json"))))
    for n in names:
        if (p / n).is_file():
            h.update(n.encode() + b"\0" + sha256_file(p / n).encode() + b"\n")
    return h.hexdigest()


def read_folder_config(path: str | Path) -> dict:
    """The folder's ``config.json``, checked to be an object detector that runs without remote code."""
    p = Path(path)
    cfg = _read_json(p / CONFIG, CONFIG)
    if "auto_map" in cfg:
        raise KacliError("config.json asks for remote code (auto_map): kacli never runs code from a model folder "
                         "(trust_remote_code is never set)", p)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise KacliError("config.json has no model_type: not a transformers model folder", p)
    return cfg


def label_slots(cfg: Mapping[str, Any], path: Path) -> list[str | None]:
    """The name of each class slot (``config.id2label``; None for an unnamed slot)."""
    raw = cfg.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise KacliError("config.json has no id2label: the model's classes are unknown", path)
    try:
        pairs = {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise KacliError("config.json's id2label has a key that is not a class index", path) from None
    n = max(pairs) + 1
    if min(pairs) < 0 or n > 100_000:
        raise KacliError(f"config.json's id2label has class index {min(pairs) if min(pairs) < 0 else n - 1} out of range", path)
    names: list[str | None] = [None] * n
    for k, v in pairs.items():
        names[k] = None if not isinstance(v, str) or v.strip() in UNNAMED else v
    if not any(names):
        raise KacliError("config.json's id2label names no class", path)
    return names


def folder_label_map(names: list[str | None]) -> dict:
    """``{"ids", "names"}`` of the named slots (ids = slot indices, the model's class ids)."""
    named = [(k, n) for k, n in enumerate(names) if n is not None]
    return {"ids": [k for k, _ in named], "names": [n for _, n in named]}


@contextlib.contextmanager
def _offline():
    """Nothing downloads while a folder loads (a config naming a hub backbone would try)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_transformers_folder(path: str | Path, *, build: bool = True) -> dict[str, Any]:
    """A transformers object-detection folder as a checkpoint-like dict: ``{"kind": "transformers",
    "path", "sha256", "family", "model_type", "classifier", "label_map" (named slots), "slots"
    (K), "num_queries", "rule" (ImageRule), "config" ({"aug": eval sizes} when the rule is
    DETR's), "transformers_version", "task": None, "model" (TransformersDetector; only with
    ``build``)}``.

    Raises KacliError (one line naming the folder or file) for a folder that is not an object
    detector transformers knows, asks for remote code, lacks its image rules or safetensors
    weights, or whose weights do not fit its config; and when transformers is not installed.
    """
    p = Path(path)
    if not p.is_dir() or not (p / CONFIG).is_file():
        raise KacliError("is not a transformers model folder (no config.json)", p)
    cfg = read_folder_config(p)
    model_type = cfg["model_type"]
    tf = _transformers()
    if tf is None:
        raise KacliError(INSTALL_HINT, p)
    if model_type not in detection_model_types():
        raise KacliError(f"is a {model_type!r} model, not an object detector transformers {tf.__version__} knows "
                         "(AutoModelForObjectDetection)", p)
    if not any((p / n).is_file() for n in WEIGHTS):
        other = [n for n in ("pytorch_model.bin", "tf_model.h5") if (p / n).is_file()]
        hint = f" ({other[0]} is not read: it can run code when loaded; save with safe_serialization)" if other else ""
        raise KacliError(f"holds no model.safetensors{hint}", p)
    if not (p / PROCESSOR).is_file():
        raise KacliError(f"holds no {PROCESSOR}: the model's image rules (size, normalisation) are unknown "
                         "(save its image processor with save_pretrained into the folder)", p)
    rule = ImageRule.from_processor(_read_json(p / PROCESSOR, PROCESSOR), p / PROCESSOR)
    names = label_slots(cfg, p / CONFIG)
    family, classifier = FAMILIES.get(model_type, (model_type, "sigmoid"))
    sequence = model_type in SEQUENCE_FAMILIES
    sizes = rule.eval_sizes()
    info: dict[str, Any] = {
        "kind": KIND, "path": str(p), "sha256": folder_sha256(p), "family": family, "model_type": model_type,
        "classifier": classifier, "label_map": folder_label_map(names), "slots": len(names),
        "num_queries": int(cfg.get("num_queries") or cfg.get("num_detection_tokens") or 0), "rule": rule, "transformers_version": tf.__version__,
        "config": {"aug": {"eval_size": sizes[0], "max_size": sizes[1]}} if sizes else {}, "task": None,
        "sequence": sequence,
    }
    if sequence:  # the encoder's width and depth (its stride is measured once the model is built)
        info["d_model"] = int(cfg.get("d_model") or cfg.get("hidden_size") or 0)
        info["enc_layers"] = int(cfg.get("encoder_layers") or 0)
    if build:
        model = TransformersDetector(_load_model(p, len(names)), rule, classifier, len(names), p, info["label_map"]["ids"])
        if not info["num_queries"]:  # a config that does not name its query count: one small image tells it
            probe = model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
            info["num_queries"] = int(probe["pred_logits"].shape[1])
        if sequence:
            info["stride"] = model.encoder_stride()
        info["model"] = model
    return info


def _load_model(p: Path, slots: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForObjectDetection

    with _offline(), _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' advice on CUDA kernels and head sizes
        try:
            config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=False)
            for attr in ("use_pretrained_backbone",):
                if getattr(config, attr, False):
                    setattr(config, attr, False)  # the folder's weights hold the backbone: nothing downloads
            if int(getattr(config, "num_labels", slots)) != slots:
                raise KacliError(f"config.json has num_labels {config.num_labels} but id2label {slots} slots", p / CONFIG)
            model, info = AutoModelForObjectDetection.from_pretrained(
                p, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True)  # listed in the loading info, refused below
        except KacliError:
            raise
        except ImportError as e:
            raise KacliError(f"cannot build the model: {_first_line(e)}", p) from None
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
            raise KacliError(f"transformers cannot load the model: {_first_line(e)}", p) from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = (f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing
                else f"{len(mismatched)} tensors of another shape (e.g. {mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]})")
        raise KacliError(f"model.safetensors does not match config.json: {what}", p)
    model.eval().requires_grad_(False)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise KacliError(f"weights hold NaN or infinite values ({len(bad)} tensors: {bad[0]}); the model cannot be used", p)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own warnings (unused weights, processor defaults) stay out of kacli's output."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line[:300]


def load_detector(path: str | Path) -> dict[str, Any]:
    """A kacli checkpoint (file or run folder, :func:`kacli.models.checkpoint.load_checkpoint`) or a
    transformers folder (:func:`load_transformers_folder`): what ``kacli eval`` and ``predict`` score."""
    if is_transformers_folder(path):
        return load_transformers_folder(path)
    return load_checkpoint(path)


def match_categories(ckpt: dict[str, Any], categories: Mapping[int, str], renames: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """A transformers folder's dict made to score on a dataset: its named slots matched to the
    dataset's ``categories`` (``{id: name}``) by name (after ``renames``, as teachers are), the
    model restricted to the matched slots and the label map's ids the dataset's. A kacli
    checkpoint's dict is returned as it is (its ids are already category ids).

    Raises KacliError when no class of the folder is one of the dataset's categories."""
    if ckpt["kind"] != KIND:
        return ckpt
    keys = rename_keys(renames or {})
    by_name = {name_key(n): int(i) for i, n in categories.items()}
    slots, ids, names = [], [], []
    for slot, name in zip(ckpt["label_map"]["ids"], ckpt["label_map"]["names"]):
        cid = by_name.get(name_key(renamed(name, keys)))
        if cid is not None and cid not in ids:
            slots.append(int(slot))
            ids.append(cid)
            names.append(categories[cid])
    if not ids:
        have = ", ".join(ckpt["label_map"]["names"][:8])
        raise KacliError(f"none of the model's classes ({have}) is a category of the dataset", ckpt["path"])
    ckpt["model"].keep_slots(slots)
    return ckpt | {"label_map": {"ids": ids, "names": names}}


def build_detector(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model of :func:`load_detector`'s dict (a transformers folder's is built when loaded)."""
    return ckpt["model"] if ckpt["kind"] == KIND else build_model(dict(ckpt))


__all__ = ["FAMILIES", "INSTALL_HINT", "KIND", "SEQUENCE_FAMILIES", "ImageRule", "TransformersDetector", "build_detector", "folder_label_map",
           "folder_sha256", "is_transformers_folder", "load_detector", "match_categories", "label_slots", "load_transformers_folder", "read_folder_config"]
