"""Where a student's teacher outputs come from, and the training data that goes with them.

:class:`TeacherSource` (``amalgamate --teacher``): the teachers loaded and run, frozen, on every
batch (:class:`~kacli.teachers.online.OnlineTeachers`); the images are fresh training views of the
manifest's train split every epoch; the settings come from the first teacher's checkpoint. It
reads no cache. :class:`~kacli.amalgamation.cache_source.CacheSource` (``--cache``) is the other
source, in its own module so that the online path imports nothing of :mod:`kacli.cache`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kacli.amalgamation.config import AmalgamateConfig
from kacli.amalgamation.objective import AmalgamationObjective, CacheNeeds
from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.errors import KacliError
from kacli.teachers.layers import layer_names
from kacli.teachers.load import Teacher, first_kacli_teacher, sequence_teachers
from kacli.teachers.online import OnlineTeachers


def collate_ground_truth(batch, stride: int):
    """``collate`` padded to a multiple of ``stride`` (as ``collate_cached`` pads), teacher None."""

    images, mask, targets = collate(batch, size_divisibility=stride)
    return images, mask, targets, None


@dataclass
class TeacherSource:
    """The teachers, loaded and checked against the manifest, to run in the training loop."""

    teachers: list[Teacher]
    manifest: TaskManifest
    noun = "teachers"

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    @property
    def num_parts(self) -> int:
        """The teachers with sequences (kacli checkpoints): the student's parts."""
        return len(sequence_teachers(self.teachers))

    def present(self, layers: Sequence[str]) -> list[list[bool]]:
        """``(N_s, L)``: whether sequence teacher k gives layer j of ``layers`` (:meth:`Teacher.gives`)."""
        return [[name in t.gives(layers) for name in layers] for t in sequence_teachers(self.teachers)]

    @property
    def first(self) -> Teacher:
        """The first kacli teacher: its width, depth, stride (every SA teacher's) and settings are the student's."""
        return first_kacli_teacher(self.teachers)

    @property
    def layers(self) -> list[str]:
        """Every layer the teachers give: ``proj``, ``enc1``, …, ``encL``."""
        return layer_names("all", self.enc_layers)

    @property
    def label_map(self) -> dict:
        return self.manifest.student_label_map()

    @property
    def teacher_label_maps(self) -> list[dict]:
        return [t.label_map for t in self.teachers]

    @property
    def d_model(self) -> int:
        return self.first.d_model

    @property
    def enc_layers(self) -> int:
        return self.first.enc_layers

    @property
    def stride(self) -> int:
        return self.first.stride

    @property
    def where(self) -> Path:
        return self.first.path

    def sha256(self) -> list[str]:
        return [t.sha256 for t in self.teachers]

    def settings(self) -> dict:
        """The first teacher's architecture, training and augmentation settings, as
        ``cache-teachers`` would record them."""
        return self.first.settings()

    def training_data(self, objective: AmalgamationObjective, cfg: AmalgamateConfig):
        """The manifest's train split over the union label map, a fresh training view of every
        image each epoch (``cfg.aug``, seeded by ``train.seed``), padded to the teachers' stride;
        the batches' teacher is None (the objective runs the teachers)."""
        m = self.manifest
        data = CocoDetection(m.split_json("train"), m.image_root("train"), self.label_map["ids"], train=True,
                             aug=cfg.aug, generator_seed=cfg.train.seed)
        if data.num_images == 0:
            raise KacliError("the train split has no images", m.split_json("train"))
        return data, functools.partial(collate_ground_truth, stride=self.stride)

    def online_teachers(self, needs: CacheNeeds) -> OnlineTeachers | None:
        return OnlineTeachers.from_teachers(self.teachers, needs.layers) if needs.teacher else None

    def provenance(self, objective: AmalgamationObjective) -> tuple[dict, dict, dict]:
        described = [{"task": t.task, "checkpoint": str(t.path), "sha256": t.sha256} for t in self.teachers]
        meta = {"teacher_source": "online", "online": {"teachers": described, "layers": objective.layers}}
        return {"teachers": self.sha256()}, meta, {"teachers": self.sha256()}


# Where the teachers' outputs come from: both sources (:class:`TeacherSource`,
# :class:`~kacli.amalgamation.cache_source.CacheSource`) give ``manifest``, ``label_map`` (the
# union: the student's classes), ``num_teachers``, ``num_parts`` (those with sequences), ``present(layers)`` (which of them give which layer), ``layers``, ``d_model``, ``enc_layers``,
# ``stride``, ``where`` and ``noun`` (the file and the words errors name), ``teacher_label_maps``,
# ``settings()``, ``training_data()``, ``online_teachers()`` and ``provenance()``.


__all__ = ["TeacherSource", "collate_ground_truth"]
