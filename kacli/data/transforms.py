"""Replayable image transforms: a :class:`View` is the parameters of one transform.

A view is always applied to the raw decoded image as crop → horizontal flip → resize (bilinear,
antialiased) → float → ImageNet normalisation. Because a view is a handful of numbers, it can be
stored (``View.to_list`` gives 7 floats for HDF5) and replayed later on the same raw image to get
the identical tensor, bit for bit: the teacher cache stores views and the student replays them.

Sampling follows DETR's recipe (facebookresearch/detr ``datasets/coco.py``):

- evaluation: resize the shorter side to ``size``, capped so the longer side stays within
  ``max_size`` (:func:`eval_view`);
- training: random horizontal flip, then either a resize to a random scale, or a resize to a
  random ``crop_scale``, a random-size crop, and a resize to a random scale
  (:func:`sample_train_view`). The first resize of the second branch is composed with the crop,
  so the crop is expressed in the original image's pixels and the image is resampled only once.

Boxes follow the image through the same torchvision.transforms.v2 functionals
(``tv_tensors.BoundingBoxes``, XYXY), clipped to the crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kacli.config import ConfigValueError
from kacli.errors import KacliError
from kacli.limits import side_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DETR's training scales (shorter side): 480, 512, ..., 800.
DETR_SCALES = tuple(range(480, 801, 32))

VIEW_LEN = 7


@dataclass(frozen=True)
class View:
    """Parameters of one transform of one image.

    Attributes:
        flip: mirror left-right (after the crop).
        crop: ``(top, left, height, width)`` in the original image's pixels, or None for the
            whole image.
        size: output ``(height, width)`` in pixels.
    """

    flip: bool
    crop: tuple[int, int, int, int] | None
    size: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "flip", bool(self.flip))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
            if len(self.crop) != 4 or self.crop[2] < 1 or self.crop[3] < 1:
                raise ValueError(f"crop must be (top, left, height>=1, width>=1), got {self.crop}")
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height>=1, width>=1), got {self.size}")

    def to_list(self, image_size: tuple[int, int] | None = None) -> list[float]:
        """``[flip, top, left, height, width, out_h, out_w]`` as floats (exact in float32).

        A ``crop`` of None is encoded as the whole image, which needs ``image_size`` (H, W);
        views made by :func:`eval_view` and :func:`sample_train_view` always carry their crop.
        """
        crop = self.crop
        if crop is None:
            if image_size is None:
                raise ValueError("View.to_list needs image_size for a view without a crop")
            crop = (0, 0, int(image_size[0]), int(image_size[1]))
        return [float(self.flip), *(float(v) for v in crop), float(self.size[0]), float(self.size[1])]

    @classmethod
    def from_list(cls, values) -> "View":
        """Inverse of :meth:`to_list` (accepts a list, tuple, numpy array or tensor of 7 numbers)."""
        vals = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
        if len(vals) != VIEW_LEN:
            raise KacliError(f"a view has {VIEW_LEN} numbers, got {len(vals)}")
        ints = [int(round(v)) for v in vals[1:]]
        return cls(flip=vals[0] >= 0.5, crop=tuple(ints[:4]), size=tuple(ints[4:]))


@dataclass
class AugConfig:
    """Augmentation settings (DETR's by default; :data:`AUG_PRESETS` has the 64-px demo's).

    Attributes:
        scales: shorter-side sizes for the multi-scale training resize.
        max_size: cap on the longer side, for training and evaluation.
        crop_scales: shorter-side sizes of the resize that precedes the random crop.
        crop_min, crop_max: range of the crop's height and width (capped by the image), in the
            pixels of that intermediate resize.
        flip_p: probability of the horizontal flip.
        crop_p: probability of the resize-crop-resize branch (otherwise a plain resize).
        eval_size: shorter side at evaluation.
    """

    scales: tuple[int, ...] = DETR_SCALES
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    flip_p: float = 0.5
    crop_p: float = 0.5
    eval_size: int = 800

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        self.crop_scales = tuple(int(s) for s in self.crop_scales)
        for name in ("scales", "crop_scales"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ConfigValueError(name, f"must be a non-empty list of positive sizes, got {list(sizes)}")
        for name in ("max_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ConfigValueError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("scales", "crop_scales", "max_size", "eval_size", "crop_max"):
            value = getattr(self, name)
            problem = side_problem(max(value) if isinstance(value, tuple) else value)
            if problem:
                raise ConfigValueError(name, problem)
        if not 1 <= self.crop_min <= self.crop_max:
            raise ConfigValueError("crop_min", f"must be in 1..crop_max ({self.crop_max}), got {self.crop_min}")
        for name in ("flip_p", "crop_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigValueError(name, f"must be a probability in [0, 1], got {p}")


AUG_PRESETS: dict[str, AugConfig] = {
    "detr": AugConfig(),
    # The demo's 64-px images as they are, mirrored half the time: no rescaling and no crops, so
    # every batch is one size (no padding) and views are cheap to replay (docs/DEMO.md).
    "demo": AugConfig(
        scales=(64,),
        max_size=64,
        crop_scales=(64,),
        crop_min=64,
        crop_max=64,
        flip_p=0.5,
        crop_p=0.0,
        eval_size=64,
    ),
}


def resized_size(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """DETR's ``get_size_with_aspect_ratio``: shorter side → ``size``, longer side capped.

    When the longer side would exceed ``max_size``, the shorter side becomes
    ``round(max_size * short / long)``; the longer side is then ``int(size * long / short)``
    (truncated, as DETR does). Returns ``(out_h, out_w)``.
    """
    if h < 1 or w < 1:
        raise KacliError(f"image has no pixels ({h}x{w})")
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    size = max(1, size)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return max(1, int(size * h / w)), size
    return size, max(1, int(size * w / h))


def eval_view(h: int, w: int, size: int, max_size: int | None) -> View:
    """The deterministic evaluation view of an ``h × w`` image (whole image, no flip)."""
    return View(flip=False, crop=(0, 0, h, w), size=resized_size(h, w, size, max_size))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _choice(g: torch.Generator, seq) -> int:
    return seq[_randint(g, 0, len(seq) - 1)]


def _rand(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g))


def sample_train_view(h: int, w: int, aug: AugConfig, generator: torch.Generator) -> View:
    """A random DETR training view of an ``h × w`` image; deterministic given ``generator``.

    Draw order: flip, branch, then (crop branch) intermediate scale, crop height, crop width,
    crop top, crop left, and finally the output scale.
    """
    g = generator
    flip = _rand(g) < aug.flip_p
    crop = (0, 0, h, w)
    if _rand(g) < aug.crop_p:
        # Resize so the shorter side is a crop scale (no cap, as in DETR), crop a random-size
        # region there, and map that region back to the original pixels.
        h1, w1 = resized_size(h, w, _choice(g, aug.crop_scales), None)
        ch = _randint(g, min(aug.crop_min, h1), min(h1, aug.crop_max))
        cw = _randint(g, min(aug.crop_min, w1), min(w1, aug.crop_max))
        top1 = _randint(g, 0, h1 - ch)
        left1 = _randint(g, 0, w1 - cw)
        sy, sx = h / h1, w / w1
        top, left = min(int(round(top1 * sy)), h - 1), min(int(round(left1 * sx)), w - 1)
        ch0 = max(1, min(int(round(ch * sy)), h - top))
        cw0 = max(1, min(int(round(cw * sx)), w - left))
        crop = (top, left, ch0, cw0)
    size = resized_size(crop[2], crop[3], _choice(g, aug.scales), aug.max_size)
    return View(flip=flip, crop=crop, size=size)


def apply_view(
    image: torch.Tensor, boxes: torch.Tensor, view: View
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``view`` to a raw image and its boxes.

    Args:
        image: uint8 ``(3, H, W)`` on the CPU, as :func:`kacli.data.images.load_image` returns it.
        boxes: ``(M, 4)`` pixel xyxy in the raw image.
        view: the transform; its crop must lie inside the image.

    Returns:
        ``(img, out_boxes, keep)``: float32 ``(3, h, w)`` normalised image with
        ``(h, w) == view.size``; ``(M, 4)`` float32 xyxy in output pixels, clipped to the crop;
        ``(M,)`` bool, False for boxes with no area left after clipping.

    The same raw image and view always give the identical tensor.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"apply_view expects a uint8 (3, H, W) image, got {tuple(image.shape)} {image.dtype}")
    H, W = int(image.shape[1]), int(image.shape[2])
    top, left, ch, cw = view.crop if view.crop is not None else (0, 0, H, W)
    if top < 0 or left < 0 or top + ch > H or left + cw > W:
        raise KacliError(f"view crop {(top, left, ch, cw)} (top, left, height, width) lies outside the {H}x{W} image")
    img = tv_tensors.Image(image)
    bx = tv_tensors.BoundingBoxes(boxes.to(torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(H, W))

    img = F.crop(img, top, left, ch, cw)
    bx = F.crop(bx, top, left, ch, cw)
    # Clip to the crop (explicitly: torchvision's default clamping has changed across versions).
    lim = torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
    bx = tv_tensors.wrap(torch.minimum(bx.as_subclass(torch.Tensor).clamp(min=0), lim), like=bx)
    # One memory layout for every view, so the resize always takes the same kernel.
    img = tv_tensors.wrap(img.as_subclass(torch.Tensor).contiguous(), like=img)
    keep = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
    if view.flip:
        img = F.horizontal_flip(img)
        bx = F.horizontal_flip(bx)
    img = F.resize(img, list(view.size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    bx = F.resize(bx, list(view.size))
    img = F.to_dtype(img, torch.float32, scale=True)
    img = F.normalize(img, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return img.as_subclass(torch.Tensor), bx.as_subclass(torch.Tensor), keep.as_subclass(torch.Tensor)
