"""Training the student from the images and the teacher cache (``kacli amalgamate``, Sec. III).

No teacher runs and no teacher checkpoint is read here: every teacher output the losses need
(projected sequence and encoder layers, class logits and boxes) comes from the cache written by
``cache-teachers``, for exactly the view of the image the student sees (the cache replays it), and
so do the teachers' settings the student's configuration starts from (caches written before they
were recorded fall back to the first teacher's checkpoint). The methods, the configuration and
the loss are in :mod:`kacli.amalgamation`.

:func:`amalgamate` runs the steps: :func:`open_cache` (the cache and its manifest, checked),
:func:`resolve_config` (the configuration, checked against the cache), :func:`build_student`,
the cache read as the objective needs it (:meth:`AmalgamationObjective.needs`),
:func:`build_objective`, :func:`training_data`, :func:`train_setup`, then the trainer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kacli.amalgamation.config import AmalgamateConfig, check_method, load_amalgamate_config, teacher_settings
from kacli.amalgamation.objective import AmalgamationObjective, CacheNeeds
from kacli.cache import schema
from kacli.cache.reader import TeacherCache, cache_manifest, collate_cached
from kacli.config import apply_overrides, config_to_dict
from kacli.data.dataset import collate
from kacli.data.manifest import TaskManifest
from kacli.engine.distributed import init_distributed
from kacli.engine.rundir import RunDir
from kacli.engine.train import TrainSetup, Trainer
from kacli.engine.validate import make_validator
from kacli.errors import KacliError
from kacli.fsutil import sha256_file
from kacli.losses.sequence import SAGProjection
from kacli.models.backbone import backbone_stride, load_backbone_weights
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR
from kacli.models.student import Student


# -- checks ------------------------------------------------------------------------------------------


def check_architecture(model_cfg: ModelConfig, d_model: int, enc_layers: int, stride: int | None,
                       student_stride: int, where=None) -> None:
    """The student's width and encoder depth (and token grid) must be the teachers'."""
    if model_cfg.d_model != d_model:
        raise KacliError(f"student d_model {model_cfg.d_model} differs from the cached teachers' {d_model}", where)
    if model_cfg.enc_layers != enc_layers:
        raise KacliError(
            f"student enc_layers {model_cfg.enc_layers} differs from the cached teachers' {enc_layers}", where
        )
    if stride is not None and int(stride) != int(student_stride):
        raise KacliError(
            f"student backbone stride {student_stride} differs from the cached teachers' {stride} "
            "(its token grid would not match the cached sequences)", where
        )


# -- the steps ---------------------------------------------------------------------------------------


@dataclass
class CacheSource:
    """A complete teacher cache and the manifest it was made from, as :func:`open_cache` found them."""

    path: Path
    attrs: dict
    manifest: TaskManifest

    @property
    def teachers(self) -> list[dict]:
        return list(self.attrs.get("teachers") or [])

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    @property
    def layers(self) -> list[str]:
        """The cached layers (``proj``, ``enc1``, …)."""
        return list(self.attrs["layers"])

    @property
    def label_map(self) -> dict:
        """The union label map ``{ids, names}``: the student's classes."""
        lm = self.attrs["label_map"]
        return {"ids": [int(i) for i in lm["ids"]], "names": list(lm["names"])}


def open_cache(cache_path: str | Path, tasks_path: str | Path | None) -> CacheSource:
    """Validate the (complete) cache and find its manifest: ``tasks_path`` must be the one the cache
    was made from; None: the one the cache names, unchanged since."""
    cache_path = Path(cache_path)
    with schema.open_h5(cache_path, "r") as f:
        attrs = dict(schema.validate(f, cache_path, require_complete=True).attrs)
    manifest = cache_manifest(attrs, cache_path, tasks_path)
    return CacheSource(cache_path, attrs, manifest)


def resolve_config(
    source: CacheSource,
    cfg: AmalgamateConfig | None,
    config: str | Path | Mapping | None,
    overrides: Mapping[str, Any] | None,
    device: str | None,
) -> AmalgamateConfig:
    """The run's configuration (``cfg``, or ``config`` over the teachers' settings the cache
    records), with ``overrides`` and ``device``; refused when it cannot train what it says or its
    student does not fit the cached teachers."""
    if cfg is None:
        cfg = load_amalgamate_config(config, overrides, teacher_settings(source.attrs))
    elif overrides:
        cfg = apply_overrides(cfg, overrides)
    if device is not None:
        cfg = apply_overrides(cfg, {"train.device": device})
    check_method(cfg, source.num_teachers, source.layers)
    attrs = source.attrs
    check_architecture(cfg.model, int(attrs["d_model"]), int(attrs["enc_layers"]), attrs.get("stride"),
                       backbone_stride(cfg.model), source.path)
    return cfg


def build_student(cfg: AmalgamateConfig, num_classes: int, num_teachers: int) -> nn.Module:
    """The model ``cfg.method`` trains: DETR (``raw``, ``raw-partial``, ``pseudo``), a 1-part student
    (``sag``), the N-part one."""

    if cfg.plain_detr:
        return DETR(cfg.model, num_classes)
    if cfg.method == "sag":
        return Student(cfg.model, num_classes, 1)
    return Student(cfg.model, num_classes, num_teachers, cfg.compress, cfg.compress_seed, proj_init=cfg.proj_init)


def build_objective(cfg: AmalgamateConfig, source: CacheSource, cache, needs: CacheNeeds) -> AmalgamationObjective:
    """The objective over the layers ``needs`` names (``cache`` is read with them), with SAG's
    W_a (random: drawn here) for ``sag``."""
    n = source.num_teachers
    sag_proj = SAGProjection(n, int(source.attrs["d_model"]), len(needs.layers), init=cfg.sag_init) if cfg.method == "sag" else None
    return AmalgamationObjective(cfg, len(source.label_map["ids"]), n, needs.layers, list(cache.class_index), sag_proj)


class GroundTruthOnly(torch.utils.data.Dataset):
    """The images and targets of a :class:`~kacli.cache.reader.TeacherCache` without reading the
    teachers' outputs (``raw``, ``raw-ext``): the same entries, views and labels."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, e: int):
        return self.cache.dataset[e]


def collate_ground_truth(batch, stride: int):
    """``collate`` padded to a multiple of ``stride`` (as ``collate_cached`` pads), teacher None."""

    images, mask, targets = collate(batch, size_divisibility=stride)
    return images, mask, targets, None


def training_data(objective: AmalgamationObjective, cache) -> tuple[torch.utils.data.Dataset, Callable]:
    """The training set and its collate function: the cache with the teachers' outputs when the
    objective reads them, else its images and ground truth alone."""

    if objective.needs_teacher:
        return cache, collate_cached
    return GroundTruthOnly(cache), functools.partial(collate_ground_truth, stride=cache.stride)


def train_setup(cfg: AmalgamateConfig, source: CacheSource, cache, model: nn.Module, objective: AmalgamationObjective,
                out: Path, run_dir, backbone_weights: str | Path | None) -> TrainSetup:
    """What the trainer saves with every checkpoint (kind, architecture, label map, configuration,
    inputs, provenance) and the run's signature for ``--resume``."""

    manifest = source.manifest
    cache_sha = schema.content_id(cache.attrs, source.path.stat().st_size)
    inputs = {"tasks.yaml": manifest.sha256, "cache": cache_sha}
    if backbone_weights:
        inputs["backbone_weights"] = sha256_file(backbone_weights)
    if cfg.plain_detr:
        kind, arch = "detr", cfg.model.to_dict()
    else:
        kind, arch = "student", model.arch_dict()
    meta = {
        "role": "student",
        "method": cfg.method,
        "compress": cfg.compress,
        "gt_loss": cfg.ground_truth_loss,
        "weights": {"lambda_seq": cfg.lambda_seq, "lambda_task": cfg.lambda_task, "lambda_d": cfg.lambda_d},
        "sa": config_to_dict(cfg.sa),
        "ta": config_to_dict(cfg.ta),
        "cache": {
            "path": str(source.path.resolve()),
            "content_sha256": cache_sha,
            "teachers": [{"task": t.get("task"), "checkpoint": t.get("checkpoint"), "sha256": t.get("sha256")}
                         for t in source.teachers],
            "layers": objective.layers,
        },
        "tasks_path": str(manifest.path),
    }
    return TrainSetup(
        out_dir=out,
        train=cfg.train,
        checkpoint_base={"kind": kind, "arch": arch, "label_map": source.label_map, "task": None,
                         "config": config_to_dict(cfg), "inputs": inputs, "meta": meta},
        signature={"method": cfg.method, "cache": cache_sha, "tasks.yaml": manifest.sha256,
                   **{f"arch.{k}": v for k, v in arch.items()}},
        extra_modules=[objective.sag_proj] if objective.sag_proj is not None else [],
        log_name=f"amalgamate {cfg.method}",
        run_dir=run_dir,
    )


# -- the run -----------------------------------------------------------------------------------------


def amalgamate(
    cache_path: str | Path,
    tasks_path: str | Path | None,
    cfg: AmalgamateConfig | None = None,
    out_dir: str | Path = "runs/student",
    resume: bool = False,
    backbone_weights: str | Path | None = None,
    device: str | None = None,
    *,
    config: str | Path | Mapping | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a student from the teacher cache; writes ``out_dir/{best,last}.pt``, ``metrics.jsonl``
    and ``config.yaml``.

    Args:
        cache_path: ``cache.h5`` written by ``cache-teachers``.
        tasks_path: the tasks.yaml the cache must come from; None: the one the cache names.
        cfg: a ready configuration; None: :func:`load_amalgamate_config` of ``config`` over the
            teachers' settings, with ``overrides``.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        backbone_weights: a ResNet state_dict file for the student's backbone.
        device: ``auto``, ``cpu`` or ``cuda`` (overrides ``train.device``).
        force: start over in a non-empty run folder.

    Returns:
        The trainer's summary ``{"best", "last", "train_seconds"}`` plus ``"method"`` and ``"out"``.

    Raises:
        KacliError: a cache from another manifest, a configuration with nothing to learn, a student
        whose d_model or enc_layers differs from the teachers', compression with one teacher.
    """

    source = open_cache(cache_path, tasks_path)
    cfg = resolve_config(source, cfg, config, overrides, device)
    torch.manual_seed(cfg.train.seed)
    model = build_student(cfg, len(source.label_map["ids"]), source.num_teachers)
    needs = AmalgamationObjective.needs(cfg, source.layers)
    cache = TeacherCache(source.path, layers=needs.layers, tasks=source.manifest.path,
                         dequantize=False)  # int8 travels as int8

    out = Path(out_dir)
    run_dir = RunDir(out, resume, force)  # checks only: out is replaced at the new run's first checkpoint
    if backbone_weights:
        rep = load_backbone_weights(model.backbone, backbone_weights)
        log(f"backbone weights from {backbone_weights}: loaded {rep['loaded']} tensors")
    dist = init_distributed(cfg.train.device)

    objective = build_objective(cfg, source, cache, needs)
    train_set, collate_fn = training_data(objective, cache)
    evaluate = None
    if "val" in source.manifest.splits and cfg.train.eval_every > 0:
        evaluate = make_validator(source.manifest, source.label_map, cfg.aug, dist.device, cfg.train.batch_size)
    setup = train_setup(cfg, source, cache, model, objective, out, run_dir, backbone_weights)
    result = Trainer(model, objective, train_set, collate_fn, setup, dist, evaluate=evaluate).fit(resume=resume)
    result.update(method=cfg.method, out=str(out))
    return result


__all__ = [
    "CacheSource",
    "GroundTruthOnly",
    "amalgamate",
    "build_objective",
    "build_student",
    "check_architecture",
    "collate_ground_truth",
    "open_cache",
    "resolve_config",
    "train_setup",
    "training_data",
]
