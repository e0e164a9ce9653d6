"""Loading a teacher: its checkpoint read and identified (file and sha256), checked against its
task and the other teachers, and the run settings it records.

:func:`load_teachers` loads one DETR checkpoint per task (``cache-teachers``, ``amalgamate
--teacher``, the benchmarks); :func:`teacher_file` and :func:`teacher_sha256` identify a teacher
file, :func:`teacher_label_map` reads one's classes (``merge-tasks``' teacher-only tasks), and
:func:`checkpoint_settings` / :meth:`Teacher.settings` give the settings the student's
configuration starts from (the first teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from kacli.data.manifest import TaskManifest
from kacli.errors import KacliError
from kacli.fsutil import sha256_file
from kacli.models.checkpoint import build_model, load_checkpoint, resolve_checkpoint_path
from kacli.models.torchfile import torch_load_untrusted
from kacli.teachers.hf import folder_sha256, is_transformers_folder, load_transformers_folder
from kacli.teachers.labels import match_classes


def recorded_settings(arch: Any, config: Any) -> dict:
    """``{"model", "train"}`` a DETR checkpoint records about its run: its architecture (``arch``)
    and, beside it, its run config's ``train`` section: ``{}`` without an architecture, no
    ``train`` when the config has none. This is what ``cache-teachers`` stores as the cache's ``teacher_settings``."""
    settings: dict = {}
    if isinstance(arch, dict):
        settings["model"] = dict(arch)
        train = config.get("train") if isinstance(config, dict) else None
        if isinstance(train, dict):
            settings["train"] = dict(train)
    return settings


def checkpoint_settings(path: str | Path) -> dict:
    """``{"model", "train"}`` recorded in the teacher checkpoint at ``path`` (:func:`recorded_settings`
    of its ``arch`` and ``config``); ``{}`` when the file is gone or is not a dict."""
    p = Path(path)
    if not p.is_file():
        return {}
    ck = torch_load_untrusted(p)
    return recorded_settings(ck.get("arch"), ck.get("config")) if isinstance(ck, dict) else {}


def teacher_file(path: str | Path) -> tuple[Path, str]:
    """A teacher checkpoint (file or run folder) as ``(file, sha256)``: what identifies it."""
    p = resolve_checkpoint_path(path)
    return p, sha256_file(p)


def teacher_sha256(path: str | Path) -> str:
    """A teacher's sha256: its checkpoint file's, or a transformers folder's
    (:func:`kacli.teachers.hf.folder_sha256`)."""
    if is_transformers_folder(path):
        return folder_sha256(path)
    return teacher_file(path)[1]


def teacher_label_map(path: str | Path) -> tuple[Path, str, dict]:
    """A teacher checkpoint's (or transformers folder's) ``(path, sha256, label_map)``; only named
    classes are in the map (an imported DETR's unnamed slots are not, see
    ``ModelConfig.unnamed_classes``; a transformers folder's ids are its class slots)."""

    if is_transformers_folder(path):
        info = load_transformers_folder(path, build=False)
        return Path(info["path"]).resolve(), info["sha256"], info["label_map"]
    p = resolve_checkpoint_path(path)
    ckpt = load_checkpoint(p)
    if ckpt["kind"] != "detr":
        raise KacliError(f"is a {ckpt['kind']} checkpoint; a teacher-only task needs a DETR teacher", p)
    return p.resolve(), sha256_file(p), ckpt["label_map"]


@dataclass
class Teacher:
    """A loaded teacher: its checkpoint file (or transformers folder), sha256, task, label map and
    model (eval mode, CPU).

    ``kind``: ``kacli`` (a kacli DETR checkpoint: its encoder sequences teach through SA, its
    predictions through TA) or ``transformers`` (a transformers folder, :mod:`kacli.teachers.hf`:
    its predictions teach through TA, and its sequences through SA only for a single-scale encoder
    family (``sequences``); ``info`` holds the folder's
    family, model type and transformers version)."""

    path: Path
    sha256: str
    task: str
    label_map: dict
    model: torch.nn.Module
    config: dict
    class_map: list[int] | None = None  # teacher class of each task class (labels.match_classes); None: the same
    kind: str = "kacli"
    info: dict | None = None
    sa_note: str | None = None  # why a folder that could give sequences teaches through TA only (load_teachers)

    @property
    def sequences(self) -> bool:
        """Whether the teacher gives sequences the student is guided by (SA): a kacli teacher does,
        and so does a transformers folder of a single-scale encoder family or of RT-DETR's hybrid
        encoder (:data:`kacli.teachers.hf.SEQUENCE_FAMILIES`, :data:`~kacli.teachers.hf.AIFI_FAMILIES`)
        whose sequences fit the kacli teachers' (``sa_note`` None)."""
        return self.kind == "kacli" or (bool((self.info or {}).get("sequence")) and self.sa_note is None)

    @property
    def layer_set(self) -> list[str] | None:
        """The layers this teacher gives (``proj``, ``enc1``, …), None: every one of the student's. An
        RT-DETR hybrid encoder gives one: the last encoder layer (its AIFI output)."""
        return None if self.kind == "kacli" else (self.info or {}).get("layers")

    def teach_ta_only(self, why: str) -> None:
        """From now on teach through TA only (a transformers folder), each view by the folder's own
        rules; ``why`` is what cache-teachers says and the cache records (``sa_off``)."""
        self.sa_note = why
        self.model.give_sequences(None)

    def gives(self, layers: Sequence[str]) -> list[str]:
        """Those of ``layers`` this teacher gives sequences of, in their order (none: TA only)."""
        if not self.sequences:
            return []
        own = self.layer_set
        return [name for name in layers if own is None or name in own]

    @property
    def num_classes(self) -> int:
        return len(self.label_map["ids"])

    @property
    def num_queries(self) -> int:
        if self.kind != "kacli":
            return int((self.info or {}).get("num_queries") or 0)
        return int(self.model.cfg.num_queries)

    def _sequence_attr(self, what: str):
        if not self.sequences:
            raise ValueError(f"a {self.kind} teacher has no {what}: it teaches through TA only")

    @property
    def d_model(self) -> int:
        self._sequence_attr("d_model")
        return int(self.info["d_model"]) if self.kind != "kacli" else int(self.model.cfg.d_model)

    @property
    def enc_layers(self) -> int | None:
        """The encoder's depth; None for an RT-DETR hybrid encoder (its one AIFI output guides the
        student's last layer, whatever the depth)."""
        self._sequence_attr("encoder sequence")
        if self.kind == "kacli":
            return int(self.model.cfg.enc_layers)
        return int(self.info["enc_layers"]) if "enc_layers" in self.info else None

    @property
    def stride(self) -> int:
        self._sequence_attr("backbone stride")
        return int(self.info["stride"]) if self.kind != "kacli" else int(self.model.backbone.stride)

    @property
    def aug(self) -> Mapping | None:
        """The augmentation section of the teacher's run config, if it records one."""
        return self.config.get("aug") if isinstance(self.config, dict) else None

    def recorded_settings(self) -> dict:
        """``{"model", "train"}`` of the teacher's run (:func:`recorded_settings` of its architecture
        and run config): what ``cache-teachers`` stores as ``teacher_settings``; ``{}`` for a
        transformers folder (not a kacli architecture)."""
        if self.kind != "kacli":
            return {}
        return recorded_settings(self.model.cfg.to_dict(), self.config)

    def settings(self) -> dict:
        """:meth:`recorded_settings` and the teacher's augmentation (``aug``) when it records one:
        the settings a student's configuration starts from."""
        base = self.recorded_settings()
        if isinstance(self.aug, Mapping):
            base["aug"] = dict(self.aug)
        return base

    def describe(self) -> dict:
        """What the cache and the run's provenance record about the teacher."""
        out = {
            "task": self.task,
            "checkpoint": str(self.path),
            "sha256": self.sha256,
            "label_map": {"ids": [int(i) for i in self.label_map["ids"]], "names": list(self.label_map["names"])},
            "num_classes": self.num_classes,
            "num_queries": self.num_queries,
        }
        if self.kind == "kacli":
            out |= {"arch": self.model.cfg.arch, "classifier": self.model.classifier}
        else:
            info = self.info or {}
            out |= {"arch": info.get("model_type"), "classifier": self.model.classifier, "kind": self.kind,
                    "family": info.get("family"), "transformers_version": info.get("transformers_version"),
                    "sequences": self.sequences,
                    **({"layers": list(self.layer_set)} if self.sequences and self.layer_set is not None else {}),
                    **({"sa_off": self.sa_note} if self.sa_note else {}),
                    "image_rule": info["rule"].to_dict() if info.get("rule") is not None else None}
        return out | ({"class_map": list(self.class_map)} if self.class_map is not None else {})


def sequence_teachers(teachers: Sequence[Teacher]) -> list[Teacher]:
    """The teachers that give sequences (SA), in order: the student has one part per each."""
    return [t for t in teachers if t.sequences]


def first_kacli_teacher(teachers: Sequence[Teacher]) -> Teacher:
    """The first kacli teacher: the settings (architecture, training, augmentation) a student and the
    cache's views start from (:func:`load_teachers` makes sure there is one)."""
    return next(t for t in teachers if t.kind == "kacli")


def load_teachers(manifest: TaskManifest, paths: Sequence[str | Path], ta_only: Sequence[str] = ()) -> list[Teacher]:
    """Load one teacher per task, in the manifest's task order, and check that they fit.

    A teacher's classes are matched to its task's by name (:func:`kacli.teachers.labels.match_classes`,
    after the manifest's renames); a teacher whose label map is not its task's (a COCO DETR for a
    few of COCO's categories) gets a ``class_map`` and its logits are stored in the task's class
    order, its other classes folded into no-object (:func:`kacli.teachers.labels.remap_logits`).

    A transformers folder (:mod:`kacli.teachers.hf`) teaches through TA, and through SA too when its
    family has a single-scale encoder (DETR, Conditional, DAB-DETR): its slots are matched
    to the task's classes by name in the same way (``class_map`` always set: positions among its named slots).

    Raises KacliError (naming the teacher file) when the count is wrong, a label map lacks one of
    its task's categories (naming the task it does fit, if any: teachers given in the wrong order),
    a teacher's d_model, encoder depth or backbone stride differs from the first kacli teacher's,
    or no teacher is a kacli checkpoint.

    ``ta_only``: tasks whose teacher (a transformers folder) teaches through TA only, whatever its
    sequences (``--ta-only``); naming a task that does not exist, or one whose teacher is a kacli
    checkpoint, is refused.
    """

    names = manifest.task_names
    if len(paths) != len(names):
        raise KacliError(
            f"give one --teacher per task, in the order of tasks.yaml ({', '.join(names)}): got {len(paths)}",
            manifest.path,
        )
    by_ids = {tuple(t.category_ids): t.name for t in manifest.tasks}
    by_set = {frozenset(t.category_ids): t.name for t in manifest.tasks}
    teachers: list[Teacher] = []
    for k, (raw_path, task) in enumerate(zip(paths, manifest.tasks)):
        if is_transformers_folder(raw_path):
            teachers.append(_transformers_teacher(raw_path, task, manifest.renames))
            continue
        path, sha = teacher_file(raw_path)
        ckpt = load_checkpoint(path)
        if ckpt["kind"] != "detr":
            raise KacliError(f"is a {ckpt['kind']} checkpoint; teachers are DETR checkpoints", path)
        ids = [int(i) for i in ckpt["label_map"]["ids"]]
        try:  # each task class's teacher class, by name: None when the label map is the task's
            class_map = match_classes(ckpt["label_map"], task.name, task.category_names, manifest.renames, path)
        except KacliError:
            fits = by_ids.get(tuple(ids)) or by_set.get(frozenset(ids))
            if fits is not None and fits != task.name:
                raise KacliError(
                    f"teacher {k + 1} holds the categories of task {fits!r}, not of task {task.name!r}: teachers given "
                    f"in the wrong order? (give them in tasks.yaml's order: {', '.join(names)})",
                    path,
                ) from None
            raise
        if ids == list(task.category_ids) and class_map == list(range(len(ids))):
            class_map = None
        label_map = ckpt["label_map"] if class_map is None else task.label_map()
        model = build_model(ckpt).eval()
        teachers.append(
            Teacher(path.resolve(), sha, task.name, label_map, model, ckpt.get("config") or {}, class_map)
        )
    for name in ta_only:
        t = next((t for t in teachers if t.task == name), None)
        if t is None:
            raise KacliError(f"--ta-only {name!r}: no such task (tasks: {', '.join(names)})", manifest.path)
        if t.kind == "kacli":
            raise KacliError(f"--ta-only {name!r}: its teacher is a kacli checkpoint, whose sequences the student is "
                             "built on; --ta-only takes tasks taught by a transformers folder", t.path)
        if t.sa_note is None:
            t.sa_note = "teaches through TA only (--ta-only)"
    with_seq = sequence_teachers(teachers)
    if not any(t.kind == "kacli" for t in teachers):
        raise KacliError("every teacher is a transformers folder: at least one must be a kacli checkpoint (it gives "
                         "the student's architecture and the sequences it is guided by; kacli import-checkpoint "
                         "converts DETR and Conditional DETR folders, kacli train-teacher trains one)", teachers[0].path)
    first = first_kacli_teacher(teachers)  # the reference: the student's width, depth and stride
    k_first = teachers.index(first) + 1
    for t in (t for t in with_seq if t is not first):
        for what in ("d_model", "enc_layers", "stride"):
            a, b = getattr(first, what), getattr(t, what)
            if b is None or a == b:  # an RT-DETR hybrid encoder has no depth to match
                continue
            label = {"d_model": "d_model", "enc_layers": "encoder depth", "stride": "backbone stride"}[what]
            if t.kind != "kacli":  # a folder still teaches through TA; its sequences do not fit
                t.sa_note = (f"teaches through TA only: its encoder's {label} {b} is not teacher {k_first}'s "
                             f"({first.path.name}: {a})")
                break
            raise KacliError(f"{label} {b} differs from teacher {k_first}'s ({first.path.name}: {a}); all teachers "
                             f"that give sequences must share it", t.path)
    for t in teachers:
        if t.kind == "kacli":
            continue
        if t.sequences:  # run at the views' own size, its sequences on kacli's grid
            aifi = t.info["sequence"] == "aifi"
            if aifi:
                t.info["layers"] = [f"enc{first.enc_layers}"]  # the AIFI output F5 → the student's last layer
            t.model.give_sequences(t.info["stride"], aifi_layer=first.enc_layers if aifi else None)
        else:  # predictions only, each view by the folder's own rules
            t.model.give_sequences(None)
    return teachers


def _transformers_teacher(raw_path: str | Path, task, renames: Mapping[str, str]) -> Teacher:
    """A transformers folder as the teacher of ``task`` (TA; SA too for a single-scale encoder); its slots
    matched by name."""
    info = load_transformers_folder(raw_path)
    path = Path(info["path"]).resolve()
    # the model's outputs are its named slots, in label-map order: positions are the class map
    class_map = match_classes(info["label_map"], task.name, task.category_names, renames, path / "config.json")
    model = info.pop("model")  # load_teachers sets what it gives (give_sequences) once the teachers are checked
    return Teacher(path, info["sha256"], task.name, task.label_map(), model, {}, class_map, kind=info["kind"], info=info,
                   sa_note=info.get("sa_note"))


__all__ = ["Teacher", "first_kacli_teacher", "sequence_teachers", "checkpoint_settings", "load_teachers", "recorded_settings", "teacher_file", "teacher_label_map",
           "teacher_sha256"]
