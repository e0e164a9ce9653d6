"""COCO-json detection dataset for training and evaluation, and the padded-batch collate.

Items are ``(image, target)``: the image transformed by a :class:`~kacli.data.transforms.View`
(sampled per item in training, DETR's evaluation resize otherwise, or replayed from a given list),
and a target dict whose boxes are normalised cxcywh and whose labels index the model's label map.

A json written by ``merge-tasks`` holds images from several datasets, each annotated only for its
own source's categories: the top-level ``complete_category_ids`` maps each source name to those
category ids, and every image names its ``source``. Targets carry ``complete``: which classes the
image's boxes are complete for (all of them for any other json).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from kacli.data.images import image_size, load_image
from kacli.data.transforms import AugConfig, View, apply_view, eval_view, sample_train_view
from kacli.errors import KacliError
from kacli.data.manifest import COMPLETE_KEY
from kacli.fsutil import load_json, require_dir, safe_join


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed from ``(seed, epoch, index)``, the same in every process."""
    d = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def train_view(h: int, w: int, image_index: int, epoch: int, aug: AugConfig, seed: int) -> View:
    """The training view of image ``image_index`` (``h × w`` pixels) in ``epoch``: DETR's random
    flip and resize(-crop-resize), drawn from a generator seeded with ``item_seed(seed, epoch,
    image_index)``, so it is the same in every process and on every rerun."""
    g = torch.Generator().manual_seed(item_seed(seed, epoch, image_index))
    return sample_train_view(h, w, aug, g)


def entry_view(h: int, w: int, image_index: int, view_index: int, aug: AugConfig, seed: int) -> View:
    """The view policy of the teacher cache: view 0 of an image is its evaluation view; view
    ``v > 0`` is the training view that ``CocoDetection(train=True, generator_seed=seed)`` draws
    for the image in epoch ``v`` (:func:`train_view`). A pure function of ``(seed, image, view)``."""
    if view_index == 0:
        return eval_view(h, w, aug.eval_size, aug.max_size)
    return train_view(h, w, image_index, view_index, aug, seed)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class CocoDetection(Dataset):
    """Images and boxes of a COCO dict (as written by ``split-tasks``).

    Args:
        json_path: the COCO json; ``images[].file_name`` is relative to ``image_root``.
        image_root: folder the image paths are resolved under (no escaping it).
        label_ids: the model's label map as category ids; class ``k`` is ``label_ids[k]``.
            Annotations of other categories are ignored, and so are ``iscrowd`` ones.
        train: sample a random training view per item; otherwise DETR's evaluation view.
        aug: augmentation settings (default :class:`AugConfig`, DETR's).
        views: optional ``[(image_index, View), ...]`` to replay instead; the dataset then has
            one item per entry.
        generator_seed: seed of the per-item training views (see :meth:`set_epoch`).

    Items: ``(image (3, h, w) float32, target)`` with target ``boxes (M, 4)`` cxcywh normalised
    by the output ``w, h``; ``labels (M,)`` int64; ``image_id`` int; ``orig_size`` int64
    ``[H, W]``; ``size`` int64 ``[h, w]``; ``view`` (list of 7 floats, :meth:`View.to_list`);
    ``complete`` bool ``(K,)`` in ``label_ids`` order, True where the image's annotations are
    complete for that class (every class unless the json is a merged one, see the module doc).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        label_ids: Sequence[int],
        train: bool,
        aug: AugConfig | None = None,
        views: Sequence[tuple[int, View]] | None = None,
        generator_seed: int = 0,
    ):
        self.json_path = Path(json_path)
        self.image_root = require_dir(image_root, "image root")
        self.label_ids = [int(c) for c in label_ids]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise KacliError(f"label map has repeated category ids: {self.label_ids}", self.json_path)
        self.train = bool(train)
        self.aug = aug if aug is not None else AugConfig()
        self.generator_seed = int(generator_seed)
        self.epoch = 0
        self._parse(load_json(self.json_path))
        self.views = None
        if views is not None:
            self.views = []
            for idx, view in views:
                if not 0 <= int(idx) < len(self.images):
                    n = len(self.images)
                    raise KacliError(f"view refers to image index {idx}, the file has {n} images", self.json_path)
                self.views.append((int(idx), view))

    def _parse(self, coco) -> None:
        src = self.json_path
        if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
            raise KacliError("not a COCO annotation file (no 'images' list)", src)
        anns = coco.get("annotations", [])
        if not isinstance(anns, list):
            raise KacliError("'annotations' must be a list", src)
        self.images: list[dict] = []
        pos: dict[int, int] = {}
        for i, im in enumerate(coco["images"]):
            if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)):
                raise KacliError(f"images[{i}] needs an integer 'id' and a 'file_name'", src)
            if im["id"] in pos:
                raise KacliError(f"image id {im['id']} appears twice", src)
            pos[im["id"]] = i
            self.images.append(im)
        label_index = {c: k for k, c in enumerate(self.label_ids)}
        boxes: list[list[list[float]]] = [[] for _ in self.images]
        labels: list[list[int]] = [[] for _ in self.images]
        for j, a in enumerate(anns):
            if not isinstance(a, dict) or a.get("image_id") not in pos:
                raise KacliError(f"annotations[{j}] refers to an unknown image", src)
            if a.get("iscrowd", 0) or a.get("category_id") not in label_index:
                continue
            bb = a.get("bbox")
            if not isinstance(bb, list) or len(bb) != 4 or not all(_number(v) for v in bb):
                raise KacliError(f"annotations[{j}] has no valid 'bbox' [x, y, w, h]", src)
            x, y, w, h = (float(v) for v in bb)
            i = pos[a["image_id"]]
            boxes[i].append([x, y, x + w, y + h])
            labels[i].append(label_index[a["category_id"]])
        self._boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        self._labels = [torch.tensor(lab, dtype=torch.int64) for lab in labels]
        self._parse_complete(coco.get(COMPLETE_KEY))

    def _parse_complete(self, complete) -> None:
        """Per image, the index of its ``complete`` mask in ``self._masks`` (K,) bool."""
        src = self.json_path
        every = torch.ones(len(self.label_ids), dtype=torch.bool)
        if complete is None:
            self._masks, self._mask_of = [every], [0] * len(self.images)
            return
        if not isinstance(complete, dict) or not all(
            isinstance(v, list) and all(isinstance(c, int) for c in v) for v in complete.values()
        ):
            raise KacliError(f"'{COMPLETE_KEY}' must map each source name to a list of category ids", src)
        index = {name: k for k, name in enumerate(complete)}
        sets = [set(ids) for ids in complete.values()]
        self._masks = [torch.tensor([c in ids for c in self.label_ids], dtype=torch.bool) for ids in sets]
        self._mask_of = []
        for i, im in enumerate(self.images):
            k = index.get(im.get("source"))
            if k is None:
                raise KacliError(
                    f"images[{i}] names source {im.get('source')!r}, which '{COMPLETE_KEY}' lacks", src
                )
            self._mask_of.append(k)

    def complete(self, index: int) -> torch.Tensor:
        """``(K,)`` bool: the classes image ``index``'s annotations are complete for (label map order)."""
        return self._masks[self._mask_of[index]].clone()

    # -- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.views) if self.views is not None else len(self.images)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose training views are sampled (call before each epoch)."""
        self.epoch = int(epoch)

    def image_info(self, index: int) -> dict:
        """The json's entry for image ``index`` (id, file_name, width, height, ...)."""
        return self.images[index]

    def image_path(self, index: int) -> Path:
        return safe_join(self.image_root, self.images[index]["file_name"], source=self.json_path)

    def size_of(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index``: from the json when it gives both (positive
        integers), else from the file's header (:func:`kacli.data.images.image_size`)."""
        info = self.images[index]
        h, w = info.get("height"), info.get("width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
        return image_size(self.image_path(index))

    def raw(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image ``index`` untransformed: uint8 ``(3, H, W)``, its kept boxes ``(M, 4)`` pixel
        xyxy float32, and their category ids ``(M,)`` int64 (crowd and other categories left out)."""
        path = self.image_path(index)
        image = load_image(path)
        info = self.images[index]
        H, W = int(image.shape[1]), int(image.shape[2])
        if (info.get("height"), info.get("width")) not in ((H, W), (None, None)):
            raise KacliError(
                f"image is {H}x{W} but {self.json_path.name} says {info.get('height')}x{info.get('width')}", path
            )
        ids = torch.tensor(self.label_ids, dtype=torch.int64)[self._labels[index]]
        return image, self._boxes[index].clone(), ids

    def view_for(self, index: int, h: int, w: int) -> tuple[int, View]:
        """``(image_index, view)`` of item ``index`` for an image of ``h × w`` pixels."""
        if self.views is not None:
            return self.views[index]
        if self.train:
            return index, train_view(h, w, index, self.epoch, self.aug, self.generator_seed)
        return index, eval_view(h, w, self.aug.eval_size, self.aug.max_size)

    def __getitem__(self, index: int):
        image_index = self.views[index][0] if self.views is not None else index
        image, boxes, _ = self.raw(image_index)
        H, W = int(image.shape[1]), int(image.shape[2])
        _, view = self.view_for(index, H, W)
        try:
            img, boxes, keep = apply_view(image, boxes, view)
        except KacliError as e:
            raise KacliError(e.message, self.image_path(image_index)) from None
        h, w = view.size
        boxes = box_convert(boxes[keep], "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
        target = {
            "boxes": boxes,
            "labels": self._labels[image_index][keep],
            "image_id": int(self.images[image_index]["id"]),
            "orig_size": torch.tensor([H, W], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "view": view.to_list((H, W)),
            "complete": self.complete(image_index),
        }
        return img, target


def collate(batch, size_divisibility: int = 1):
    """Pad a list of ``(image (3, h, w), target)`` into a batch.

    Returns ``(images (B, 3, Hmax, Wmax), mask (B, Hmax, Wmax) bool, targets)``: images are
    zero-padded at the bottom and right; ``mask`` is True at padding; ``Hmax, Wmax`` are rounded
    up to a multiple of ``size_divisibility``. Use ``functools.partial`` to set it for a DataLoader.
    """
    if not batch:
        raise ValueError("collate needs at least one item")
    images = [b[0] for b in batch]
    d = max(1, int(size_divisibility))
    hmax = -(-max(int(im.shape[1]) for im in images) // d) * d
    wmax = -(-max(int(im.shape[2]) for im in images) // d) * d
    out = images[0].new_zeros((len(images), images[0].shape[0], hmax, wmax))
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool)
    for i, im in enumerate(images):
        h, w = int(im.shape[1]), int(im.shape[2])
        out[i, :, :h, :w] = im
        mask[i, :h, :w] = False
    return out, mask, [b[1] for b in batch]
