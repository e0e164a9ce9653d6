"""Image files: open under kacli's pixel limit, read a size from the header, decode to a tensor.

Every reader of image files goes through here (the dataset, the COCO/VOC/YOLO readers, the cache
plan, predict), so an image that is missing, unreadable or over the pixel limit is the same
one-line error everywhere. This module imports nothing of :mod:`kacli.data` (and torch only to
decode), so the dataset readers can all use it.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from PIL import Image, UnidentifiedImageError

from kacli.errors import KacliError
from kacli.limits import max_image_pixels

if TYPE_CHECKING:
    import torch

_pil_lock = threading.Lock()  # PIL's own pixel check is switched off around Image.open only

#: What PIL raises for a file it cannot read (and a header over PIL's own bomb limit).
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` under kacli's pixel limit (:func:`kacli.limits.max_image_pixels`,
    ``KACLI_MAX_IMAGE_PIXELS``) instead of PIL's: an image file whose header declares more pixels
    is refused, naming it, before any pixel is decoded."""
    p = Path(path)
    cap = max_image_pixels()
    with _pil_lock:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = old
    with im:
        w, h = im.size
        if w * h > cap:
            raise KacliError(
                f"image is {w}x{h} = {w * h:,} pixels, over the limit of {cap:,} "
                "(set KACLI_MAX_IMAGE_PIXELS to raise it)", p,
            )
        yield im


@contextlib.contextmanager
def read_image(path: str | Path) -> Iterator[Image.Image]:
    """:func:`open_image` with every file problem, in the block too, as a KacliError naming the file:
    ``image not found``, ``image path is not a file``, ``not a readable image (<PIL's error>)``."""
    p = Path(path)
    if not p.is_file():
        raise KacliError("image not found" if not p.exists() else "image path is not a file", p)
    try:
        with open_image(p) as im:
            yield im
    except UNREADABLE as e:
        raise KacliError(f"not a readable image ({type(e).__name__})", p) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header without decoding pixels."""
    with read_image(path) as im:
        w, h = im.size
    return int(h), int(w)


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file (any format PIL reads) as uint8 RGB ``(3, H, W)``, contiguous, CPU.

    EXIF orientation is not applied, so pixels match the annotations' coordinates (as in COCO).
    Files over the pixel limit are refused before decoding (:func:`open_image`).
    """
    import numpy as np
    import torch

    with read_image(path) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


__all__ = ["open_image", "read_image", "image_size", "load_image"]
