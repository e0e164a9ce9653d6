"""A transformers folder's image rules: what its image processor (``preprocessor_config.json``, as
transformers reads it) does to an image before the model sees it (resize rule, rescale,
normalisation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kacli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kacli.errors import KacliError


def aspect_size(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """transformers' DETR-family resize (``get_size_with_aspect_ratio``): the shorter side becomes
    ``size``; when the longer would pass ``max_size``, the shorter becomes ``round(max_size · short /
    long)`` and the longer ``int(max_size · short / long · long / short)`` — from the unrounded
    value, where kacli's own views (:func:`kacli.data.transforms.resized_size`) use the rounded one,
    so the two differ by a pixel on some sizes. Returns ``(out_h, out_w)``."""
    raw = None
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            raw = max_size * lo / hi
            size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int((raw if raw is not None else size) * h / w), size
    return size, int((raw if raw is not None else size) * w / h)


@dataclass(frozen=True)
class ImageRule:
    """What the folder's image processor does to an image before the model sees it.

    ``size``: the resize rule, one of ``{"shortest_edge"[, "longest_edge"]}`` (aspect kept, DETR's
    rule), ``{"height", "width"}`` (stretched to exactly that), ``{"max_height", "max_width"}``
    (aspect kept, fit inside), or None (no resize); ``scale``: what a [0, 1] pixel is
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
            known = ({"shortest_edge", "longest_edge"}, {"height", "width"}, {"max_height", "max_width"}, {"shortest_edge"})
            if set(raw) not in known or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192
                                                for v in raw.values()):
                raise KacliError(f"size {raw!r} is not a resize rule kacli knows (shortest_edge[/longest_edge], "
                                 "height/width or max_height/max_width, in pixels up to 8192)", path)
            size = tuple(sorted((str(k), int(v)) for k, v in raw.items()))
        scale = number("rescale_factor", 1 / 255) * 255.0 if data.get("do_rescale", True) else 255.0
        if data.get("do_normalize", True):
            mean, std = triple("image_mean", IMAGENET_MEAN), triple("image_std", IMAGENET_STD)
        else:
            mean = std = None
        return cls(size, scale, mean, std)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` an ``h × w`` image is resized to, by transformers' own rules: the shorter
        side to ``shortest_edge`` with the longer at most ``longest_edge`` (:func:`aspect_size`),
        exactly ``height × width``, or the largest size inside ``max_height × max_width``
        (truncated)."""
        if self.size is None:
            return h, w
        s = dict(self.size)
        if "height" in s:
            return s["height"], s["width"]
        if "shortest_edge" in s:
            return aspect_size(h, w, s["shortest_edge"], s.get("longest_edge"))
        r = min(s["max_height"] / h, s["max_width"] / w)
        return max(1, int(h * r)), max(1, int(w * r))

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
        return None

    def to_dict(self) -> dict:
        return {"size": dict(self.size) if self.size else None, "scale": self.scale,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}


__all__ = ["ImageRule", "aspect_size"]
