"""Training the student (``kacli amalgamate``, Sec. III) from the teachers' outputs: read from the
teacher cache, or computed by the teachers in the training loop.

Two sources give the teachers' outputs:

- :class:`~kacli.amalgamation.cache_source.CacheSource` (``--cache``): the teacher cache written by
  ``cache-teachers``; no teacher runs and no teacher checkpoint is read. Its module is imported only
  when a cache is given.
- :class:`~kacli.amalgamation.sources.TeacherSource` (``--teacher`` … ``--tasks``): the teachers
  are loaded (:func:`kacli.teachers.load.load_teachers`) and run, frozen, on every batch
  (:class:`~kacli.teachers.online.OnlineTeachers`); nothing of :mod:`kacli.cache` is imported.

The objective sees the same ``teacher`` dict either way, so the same losses apply. The methods,
the configuration and the loss are in :mod:`kacli.amalgamation`.

:func:`amalgamate` runs the steps: :func:`open_source` (the cache or the teachers, and the
manifest, checked), :func:`resolve_config` (the configuration, checked against the teachers),
:func:`build_student`, what the objective needs (:meth:`AmalgamationObjective.needs`),
:func:`build_objective`, the source's training data, :func:`train_setup`, then the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

from kacli import training
from kacli.amalgamation.config import AmalgamateConfig, check_method, load_amalgamate_config
from kacli.amalgamation.objective import AmalgamationObjective, CacheNeeds
from kacli.amalgamation.sources import TeacherSource
from kacli.config import apply_overrides, config_to_dict
from kacli.data.manifest import TaskManifest
from kacli.engine.train import TrainSetup
from kacli.errors import KacliError
from kacli.losses.sequence import SAGProjection
from kacli.models.backbone import backbone_stride
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR
from kacli.models.student import Student
from kacli.teachers.labels import class_index
from kacli.teachers.load import load_teachers

if TYPE_CHECKING:
    from kacli.amalgamation.cache_source import CacheSource


# -- checks ------------------------------------------------------------------------------------------


def check_architecture(model_cfg: ModelConfig, d_model: int, enc_layers: int, stride: int | None,
                       student_stride: int, where: Path, teachers: str) -> None:
    """The student's width and encoder depth (and token grid) must be the teachers' (``teachers``:
    how the messages name them, e.g. "cached teachers"; ``where``: the file they name)."""
    if model_cfg.d_model != d_model:
        raise KacliError(f"student d_model {model_cfg.d_model} differs from the {teachers}' {d_model}", where)
    if model_cfg.enc_layers != enc_layers:
        raise KacliError(f"student enc_layers {model_cfg.enc_layers} differs from the {teachers}' {enc_layers}", where)
    if stride is not None and int(stride) != int(student_stride):
        raise KacliError(
            f"student backbone stride {student_stride} differs from the {teachers}' {stride} "
            "(its token grid would not match the teachers' sequences)", where
        )


# -- the steps ---------------------------------------------------------------------------------------


def open_cache(cache_path: str | Path, tasks_path: str | Path | None, allow_val: bool = False) -> CacheSource:
    """The cache source (:func:`kacli.amalgamation.cache_source.open_cache`), imported only when a
    cache is given: ``amalgamate --teacher`` reads no cache module."""
    from kacli.amalgamation.cache_source import open_cache as open_cache_file

    return open_cache_file(cache_path, tasks_path, allow_val)


def open_teachers(teachers: Sequence[str | Path], tasks_path: str | Path | None,
                  ta_only: Sequence[str] = ()) -> TeacherSource:
    """Load the teachers (checkpoints or run folders, in ``tasks_path``'s task order) and check
    that they fit the manifest and each other (:func:`kacli.teachers.load.load_teachers`)."""
    if tasks_path is None:
        raise KacliError("--teacher needs --tasks: the tasks.yaml whose tasks the teachers detect, in its order")
    manifest = TaskManifest(tasks_path)
    return TeacherSource(load_teachers(manifest, list(teachers), ta_only), manifest)


def open_source(cache_path: str | Path | None, teachers: Sequence[str | Path] | None,
                tasks_path: str | Path | None, allow_val: bool = False,
                ta_only: Sequence[str] = ()) -> CacheSource | TeacherSource:
    """The cache (``cache_path``; of the train split unless ``allow_val``) or the teachers to run
    online (``teachers``; they always train on the train split): exactly one."""
    if cache_path is not None and teachers:
        raise KacliError("give either --cache (train from the teacher cache) or --teacher (run the teachers "
                         "online), not both")
    if cache_path is not None:
        if ta_only:
            raise KacliError("--ta-only chooses what the teachers give: pass it to cache-teachers (the cache holds "
                             "what they gave), or use it with --teacher")
        return open_cache(cache_path, tasks_path, allow_val)
    if teachers:
        return open_teachers(teachers, tasks_path, ta_only)
    raise KacliError("give --cache FILE (a teacher cache) or one --teacher per task of --tasks (teachers run online)")


def resolve_config(
    source: CacheSource | TeacherSource,
    cfg: AmalgamateConfig | None,
    config: str | Path | Mapping | None,
    overrides: Mapping[str, Any] | None,
    device: str | None,
) -> AmalgamateConfig:
    """The run's configuration (``cfg``, or ``config`` over the teachers' settings the source
    gives), with ``overrides`` and ``device``; refused when it cannot train what it says or its
    student does not fit the teachers."""
    if cfg is None:
        cfg = load_amalgamate_config(config, overrides, source.settings())
    elif overrides:
        cfg = apply_overrides(cfg, overrides)
    if device is not None:
        cfg = apply_overrides(cfg, {"train.device": device})
    check_method(cfg, source.num_parts, source.layers, source.present(source.layers))
    check_architecture(cfg.model, source.d_model, source.enc_layers, source.stride, backbone_stride(cfg.model),
                       source.where, source.noun)
    return cfg


def build_student(cfg: AmalgamateConfig, num_classes: int, num_teachers: int) -> nn.Module:
    """The model ``cfg.method`` trains: DETR (``raw``, ``raw-partial``, ``pseudo``), a 1-part student
    (``sag``), the N-part one (``num_teachers``: the teachers with sequences; a transformers teacher,
    of a multi-scale family, which teaches through TA only, has no part)."""

    if cfg.plain_detr:
        return DETR(cfg.model, num_classes)
    if cfg.method == "sag":
        return Student(cfg.model, num_classes, 1)
    return Student(cfg.model, num_classes, num_teachers, cfg.compress, cfg.compress_seed, proj_init=cfg.proj_init)


def build_objective(cfg: AmalgamateConfig, source: CacheSource | TeacherSource, needs: CacheNeeds) -> AmalgamationObjective:
    """The objective over the layers ``needs`` names, with SAG's W_a (random: drawn here) for
    ``sag``, and the teachers to run on every batch when the source runs them online."""
    n = source.num_parts  # the teachers with sequences
    sag_proj = SAGProjection(n, source.d_model, len(needs.layers), init=cfg.sag_init) if cfg.method == "sag" else None
    index = class_index(source.label_map, source.teacher_label_maps, source.where)
    return AmalgamationObjective(cfg, len(source.label_map["ids"]), source.num_teachers, needs.layers, index, sag_proj,
                                 teachers=source.online_teachers(needs), num_parts=n, present=source.present(needs.layers))


def train_setup(cfg: AmalgamateConfig, source: CacheSource | TeacherSource, model: nn.Module, objective: AmalgamationObjective,
                out: Path, run_dir, backbone_weights: str | Path | None) -> TrainSetup:
    """What the trainer saves with every checkpoint (kind, architecture, label map, configuration,
    inputs, provenance) and the run's signature for ``--resume``: the cache's content id, or the
    teachers' sha256 when they run online."""

    manifest = source.manifest
    source_inputs, source_meta, source_signature = source.provenance(objective)
    inputs = training.input_hashes(manifest, source_inputs, {"backbone_weights": backbone_weights})
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
        **source_meta,
        "tasks_path": str(manifest.path),
    }
    return training.train_setup(
        out, cfg.train, run_dir, kind=kind, arch=arch, label_map=source.label_map, task=None,
        config=config_to_dict(cfg), inputs=inputs, meta=meta,
        signature={"method": cfg.method, **source_signature, "tasks.yaml": manifest.sha256,
                   **{f"arch.{k}": v for k, v in arch.items()}},
        extra_modules=[objective.sag_proj] if objective.sag_proj is not None else [],
        log_name=f"amalgamate {cfg.method}",
    )


# -- the run -----------------------------------------------------------------------------------------


def amalgamate(
    cache_path: str | Path | None,
    tasks_path: str | Path | None,
    cfg: AmalgamateConfig | None = None,
    out_dir: str | Path = "runs/student",
    resume: bool = False,
    backbone_weights: str | Path | None = None,
    device: str | None = None,
    *,
    teachers: Sequence[str | Path] | None = None,
    config: str | Path | Mapping | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    allow_val: bool = False,
    log: Callable[[str], None] = print,
    ta_only: Sequence[str] = (),
) -> dict:
    """Train a student from the teacher cache, or with the teachers run in the training loop;
    writes ``out_dir/{best,last}.pt``, ``metrics.jsonl`` and ``config.yaml``.

    Args:
        cache_path: ``cache.h5`` written by ``cache-teachers``; None with ``teachers``.
        tasks_path: the tasks.yaml the cache must come from (None: the one the cache names), or
            the one whose tasks the ``teachers`` detect (required with them).
        cfg: a ready configuration; None: :func:`load_amalgamate_config` of ``config`` over the
            teachers' settings, with ``overrides``.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        backbone_weights: a ResNet state_dict file for the student's backbone.
        device: ``auto``, ``cpu`` or ``cuda`` (overrides ``train.device``).
        teachers: one teacher checkpoint (or run folder) per task of ``tasks_path``, in its order,
            to run online instead of reading a cache (exclusive with ``cache_path``).
        force: start over in a non-empty run folder.
        allow_val: train from a cache of a split other than ``train`` (refused otherwise).

    Returns:
        The trainer's summary ``{"best", "last", "train_seconds"}`` plus ``"method"`` and ``"out"``.

    Raises:
        KacliError: both or neither of ``cache_path`` and ``teachers``; ``teachers`` without
        ``tasks_path``; a cache of a split other than ``train`` without ``allow_val``; a cache
        from another manifest or teachers that do not fit it (count, order, label maps); a
        configuration with nothing to learn; a student whose d_model or enc_layers differs from
        the teachers'; compression with one teacher. Nothing is written then.
    """

    source = open_source(cache_path, teachers, tasks_path, allow_val, ta_only)
    if isinstance(source, TeacherSource):  # online: a folder that teaches through TA only says why
        for t in source.teachers:
            if t.sa_note:
                log(f"{t.path.name}: {t.sa_note}")
    cfg = resolve_config(source, cfg, config, overrides, device)
    training.seed_model(cfg.train.seed)
    model = build_student(cfg, len(source.label_map["ids"]), source.num_parts)
    needs = AmalgamationObjective.needs(cfg, source.layers)
    objective = build_objective(cfg, source, needs)
    train_set, collate_fn = source.training_data(objective, cfg)

    out = Path(out_dir)
    # checks (out is replaced at the first checkpoint) and locks the folder until the run ends
    with training.run_folder(out, resume, force) as run_dir:
        result = _train(cfg, source, model, objective, train_set, collate_fn, out, run_dir, backbone_weights, resume, log)
    result.update(method=cfg.method, out=str(out))
    return result


def _train(cfg, source, model, objective, train_set, collate_fn, out, run_dir, backbone_weights, resume, log) -> dict:
    training.load_backbone(model, backbone_weights, log)
    dist = training.start_distributed(cfg.train.device)

    evaluate = training.validator(source.manifest, source.label_map, cfg.aug, cfg.train, dist)
    setup = train_setup(cfg, source, model, objective, out, run_dir, backbone_weights)
    return training.fit(model, objective, train_set, collate_fn, setup, dist, evaluate, resume)


__all__ = [
    "amalgamate",
    "build_objective",
    "build_student",
    "check_architecture",
    "open_cache",
    "open_source",
    "open_teachers",
    "resolve_config",
    "train_setup",
]
