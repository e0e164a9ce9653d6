"""Boxes drawn on images: one colour per group (a teacher, the student), labelled, with a legend.

Used by ``kacli predict`` and by the demo's pictures (the paper's Fig. 5: each teacher's boxes in its
own colour beside the student's). PIL only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Fixed, mutually distinct colours (matplotlib's tab10); group i takes PALETTE[i % 10].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_pil(image: Any) -> Image.Image:
    """A PIL RGB copy of ``image``: a PIL image, or a uint8 array/tensor of shape (3, H, W)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = _numpy(image)
    if a.ndim != 3 or a.shape[0] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image of shape (3, H, W), got {a.dtype} {tuple(a.shape)}")
    return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), "RGB")


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def draw_detections(image: Any, groups: Sequence[Mapping], min_size: int = 0) -> Image.Image:
    """Draw each group's boxes in its colour, each box labelled ``"<label> <score>"``.

    Args:
        image: PIL image or uint8 tensor/array (3, H, W); not modified.
        groups: ``[{"boxes": (M, 4) pixel xyxy, "labels": [str] * M, "scores": [float] * M | None,
            "color": (r, g, b) | None, "name": str}, ...]``. A group without ``color`` takes the
            palette's colour at its position. With more than one group a legend names them.
        min_size: if the image's shorter side is below this, it is enlarged (nearest neighbour, boxes
            scaled alike) so that small images still have readable labels; 0 keeps the size.

    Returns:
        A new RGB PIL image.
    """
    img = to_pil(image)
    scale = 1.0
    if min_size and min(img.size) < min_size:
        scale = min_size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
    w, h = img.size
    line = max(1, round(min(w, h) / 250))
    font = _font(int(np.clip(round(min(w, h) / 40), 10, 24)))
    draw = ImageDraw.Draw(img)

    labels_to_draw = []
    legend = []
    for gi, g in enumerate(groups):
        colour = tuple(g.get("color") or PALETTE[gi % len(PALETTE)])
        legend.append((str(g.get("name", f"group {gi + 1}")), colour))
        boxes = _numpy(g.get("boxes", np.zeros((0, 4)))).reshape(-1, 4).astype(float) * scale
        labels = list(g.get("labels") or [""] * len(boxes))
        scores = g.get("scores")
        scores = None if scores is None else [float(s) for s in _numpy(scores).reshape(-1)]
        if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
            raise ValueError(f"group {gi}: {len(boxes)} boxes but {len(labels)} labels / scores")
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
            text = " ".join(t for t in (labels[i], None if scores is None else f"{scores[i]:.2f}") if t)
            if text:
                labels_to_draw.append((text, colour, x0, y0, y1))

    # Labels after every box so no outline crosses a label; above the box when it fits.
    pad = 1
    for text, colour, x0, y0, y1 in labels_to_draw:
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 2 * pad, b - t + 2 * pad
        tx = min(max(0, x0), max(0, w - tw))
        ty = y0 - th if y0 - th >= 0 else min(y0, max(0, h - th))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        draw.text((tx + pad - l, ty + pad - t), text, fill=_text_colour(colour), font=font)

    if len(groups) > 1:
        _legend(draw, legend, font, w)
    return img


def _legend(draw: ImageDraw.ImageDraw, entries: list, font, width: int) -> None:
    """A white panel in the top-right corner: a colour swatch and the name of each group."""
    pad = 3
    sizes = [draw.textbbox((0, 0), name, font=font) for name, _ in entries]
    row = max(b - t for (_, t, _, b) in sizes) + pad
    swatch = row - pad
    text_w = max(r - l for (l, _, r, _) in sizes)
    pw, ph = pad * 3 + swatch + text_w, pad + row * len(entries)
    x, y = max(0, width - pw - 2), 2
    draw.rectangle([x, y, x + pw, y + ph], fill=(255, 255, 255), outline=(0, 0, 0))
    for i, ((name, colour), (l, t, _, _)) in enumerate(zip(entries, sizes)):
        ry = y + pad + i * row
        draw.rectangle([x + pad, ry, x + pad + swatch, ry + swatch], fill=colour)
        draw.text((x + 2 * pad + swatch - l, ry - t), name, fill=(0, 0, 0), font=font)
