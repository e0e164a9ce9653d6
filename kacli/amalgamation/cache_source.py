"""The teacher cache as the source of a student's teacher outputs (``amalgamate --cache``).

No teacher runs and no teacher checkpoint is read: every teacher output the losses need
(projected sequence and encoder layers, class logits and boxes) comes from the cache written by
``cache-teachers``, for exactly the view of the image the student sees (the cache replays its K
views), and so do the teachers' settings the student's configuration starts from (caches
written before they were recorded fall back to the first teacher's checkpoint).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kacli.amalgamation.config import AmalgamateConfig
from kacli.amalgamation.objective import AmalgamationObjective, CacheNeeds
from kacli.amalgamation.sources import collate_ground_truth
from kacli.cache import schema
from kacli.cache.schema import CacheLayout
from kacli.cache.reader import TeacherCache, cache_manifest, collate_cached
from kacli.data.manifest import TaskManifest
from kacli.errors import KacliError


@dataclass
class CacheSource:
    """A complete teacher cache (its validated header) and the manifest it was made from, as
    :func:`open_cache` found them."""

    layout: CacheLayout
    manifest: TaskManifest
    noun = "cached teachers"

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def where(self) -> Path:
        return self.layout.path

    @property
    def teachers(self) -> list[dict]:
        return self.layout.teachers

    @property
    def num_teachers(self) -> int:
        return self.layout.num_teachers

    @property
    def num_parts(self) -> int:
        """The teachers with cached sequences: the student's parts."""
        return len(self.layout.seq_teachers)

    def present(self, layers: Sequence[str]) -> list[list[bool]]:
        """``(N_s, L)``: whether sequence teacher k holds layer j of ``layers``."""
        return self.layout.present(layers)

    @property
    def layers(self) -> list[str]:
        """The cached layers (``proj``, ``enc1``, …)."""
        return self.layout.layers

    @property
    def label_map(self) -> dict:
        """The union label map ``{ids, names}``: the student's classes."""
        return self.layout.label_map

    @property
    def teacher_label_maps(self) -> list[dict]:
        return self.layout.teacher_label_maps

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def enc_layers(self) -> int:
        return self.layout.enc_layers

    @property
    def stride(self) -> int:
        return self.layout.stride

    def settings(self) -> dict:
        return self.layout.teacher_settings()

    def training_data(self, objective: AmalgamationObjective, cfg: AmalgamateConfig):
        """The training set and its collate function: the cache read with the objective's layers
        (int8 travels as int8) when the objective reads the teachers' outputs, else the cache's
        entries as images and ground truth alone (the same views; the outputs are never loaded)."""
        if objective.needs_teacher:
            cache = TeacherCache(self.path, layers=objective.layers, tasks=self.manifest.path, dequantize=False,
                                 layout=self.layout)
            return cache, collate_cached
        cache = TeacherCache(self.path, layers=objective.layers, tasks=self.manifest.path, in_memory=False,
                             layout=self.layout)
        return cache.dataset, functools.partial(collate_ground_truth, stride=cache.stride)

    def online_teachers(self, needs: CacheNeeds) -> None:
        return None

    def content_id(self) -> str:
        return schema.content_id(self.layout.attrs, self.path.stat().st_size)

    def provenance(self, objective: AmalgamationObjective) -> tuple[dict, dict, dict]:
        cache_sha = self.content_id()
        meta = {
            "teacher_source": "cache",
            "cache": {
                "path": str(self.path.resolve()),
                "content_sha256": cache_sha,
                "teachers": [{"task": t.get("task"), "checkpoint": t.get("checkpoint"), "sha256": t.get("sha256")}
                             for t in self.teachers],
                "layers": objective.layers,
            },
        }
        return {"cache": cache_sha}, meta, {"cache": cache_sha}


def open_cache(cache_path: str | Path, tasks_path: str | Path | None, allow_val: bool = False) -> CacheSource:
    """Validate the (complete) cache and find its manifest: ``tasks_path`` must be the one the cache
    was made from; None: the one the cache names, unchanged since. A cache of a split other than
    ``train`` is refused unless ``allow_val``."""
    cache_path = Path(cache_path)
    layout = schema.read_layout(cache_path, require_complete=True)
    split = layout.attrs.get("split")
    if split != "train" and not allow_val:
        raise KacliError(f"cache holds the {split!r} split: training on it would fit the student to the images it "
                         "is evaluated on (cache the train split, or --allow-val to train on it anyway)", cache_path)
    manifest = cache_manifest(layout.attrs, cache_path, tasks_path)
    return CacheSource(layout, manifest)


__all__ = ["CacheSource", "open_cache"]
