"""The plan of a teacher cache: every entry, its view and its token count, before anything runs.

Every entry's view, and so its token count, is a pure function of ``(seed, image, view)``
(:func:`kacli.data.dataset.entry_view`), which gives the file's exact size up front and lets its
datasets be preallocated. :class:`CacheJob` gathers what writing any range of the plan's entries
needs; :func:`shard_plan` splits the entries between torchrun ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kacli.cache import schema
from kacli.data.dataset import CocoDetection, entry_view
from kacli.data.transforms import VIEW_LEN, AugConfig, View
from kacli.grid import token_grid
from kacli.teachers.load import Teacher


@dataclass
class EntryPlan:
    """Every entry of the cache, decided before any teacher runs.

    Arrays (E entries): ``image_index`` and ``image_id`` (E,) int64, ``view_index`` (E,) int64,
    ``view`` (E, 7) float64 (:meth:`View.to_list`), ``hw`` (E, 2) int64 token grid.
    """

    image_index: np.ndarray
    image_id: np.ndarray
    view_index: np.ndarray
    view: np.ndarray
    hw: np.ndarray
    images: int
    views_per_image: int

    @property
    def entries(self) -> int:
        return len(self.image_index)

    @property
    def tokens(self) -> np.ndarray:
        """(E,) int64 tokens per entry, h·w."""
        return self.hw[:, 0] * self.hw[:, 1]

    def offsets(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """(end−start+1,) int64 row offsets of entries [start, end), starting at 0."""
        end = self.entries if end is None else end
        return np.concatenate([[0], np.cumsum(self.tokens[start:end])]).astype(np.int64)

    def view_list(self) -> list[tuple[int, View]]:
        return [(int(i), View.from_list(v)) for i, v in zip(self.image_index, self.view)]


def plan_entries(coco: CocoDetection, aug: AugConfig, views: int, seed: int, stride: int) -> EntryPlan:
    """Entry ``e = i·K + v`` for image ``i`` and view ``v`` in ``0..K−1``."""
    n = coco.num_images
    E = n * views
    image_index = np.repeat(np.arange(n, dtype=np.int64), views)
    view_index = np.tile(np.arange(views, dtype=np.int64), n)
    image_id = np.array([int(coco.image_info(i)["id"]) for i in range(n)], dtype=np.int64)[image_index]
    view_arr = np.zeros((E, VIEW_LEN), dtype=np.float64)
    hw = np.zeros((E, 2), dtype=np.int64)
    for i in range(n):
        h, w = coco.size_of(i)
        for v in range(views):
            e = i * views + v
            view = entry_view(h, w, i, v, aug, seed)
            view_arr[e] = view.to_list((h, w))
            hw[e] = token_grid(view.size[0], view.size[1], stride)
    return EntryPlan(image_index, image_id, view_index, view_arr, hw, n, views)


@dataclass
class CacheJob:
    """What writing any range of a cache's entries needs, the same for every range and rank.

    ``plan``: the entries; ``teachers``: loaded, in the manifest's task order; ``layers``: cached
    layer names (``proj``, ``enc1``, ...); ``dtype``: storage (``float16``, ``float32``, ``int8``);
    ``batch_size``: entries per teacher batch (batches are ``[b·B, (b+1)·B)``); ``chunk``: HDF5 rows
    per chunk of the sequences; ``dataset``: the plan's views replayed
    (``CocoDetection(views=plan.view_list())``; only running the teachers reads it); ``device``
    and ``workers``: where the teachers run and how many DataLoader workers decode images;
    ``log`` and ``progress``: messages and the progress bar.
    """

    plan: EntryPlan
    teachers: Sequence[Teacher]
    layers: Sequence[str]
    dtype: str
    batch_size: int
    chunk: int
    dataset: CocoDetection | None = None
    device: torch.device = torch.device("cpu")
    workers: int = 0
    log: Callable[[str], None] = print
    progress: bool = True


def shard_plan(attrs: dict, tokens: np.ndarray, num_batches: int, batch_size: int, world: int, out: Path) -> list[dict]:
    """Contiguous batch ranges per rank: ``[{"rank", "path", "attrs"}]`` for the ranks with work.

    A shard's attributes are the cache's with its own ``entries``, ``total_tokens`` and ``shard``
    (``{rank, world_size, start, end}``)."""
    E = int(attrs["entries"])
    shards = []
    for k in range(world):
        start = min(E, (k * num_batches // world) * batch_size)
        end = min(E, ((k + 1) * num_batches // world) * batch_size)
        if end <= start:
            continue
        sa = dict(attrs)
        sa.update(
            entries=end - start,
            total_tokens=int(tokens[start:end].sum()),
            shard={"rank": k, "world_size": world, "start": start, "end": end},
        )
        shards.append({"rank": k, "path": Path(f"{out}.rank{k}.partial"), "attrs": sa})
    return shards


__all__ = ["CacheJob", "EntryPlan", "plan_entries", "shard_plan"]
