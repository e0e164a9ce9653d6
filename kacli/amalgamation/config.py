"""The configuration of ``kacli amalgamate``: the training methods, :class:`AmalgamateConfig`
(with its SA and TA sections), its loader over the teachers' settings, and the check that a
configuration can train what it says.

Methods (:data:`TRAINING_METHODS`):

- ``ka``: the extended student (one projection per teacher, decoupled encoder, optional
  compression) trained with Eq. 12: ``λ_seq·L_seq + λ_task·L_task + λ_d·L_d``. L_seq is the SA loss
  (Eq. 2) over the cached layers (the projection and the encoder layers), L_task the TA loss
  (Eq. 9–11) against the pooled teacher predictions, L_d DETR's set criterion on the ground truth
  over the union label set.
- ``raw``: a plain DETR on the ground truth only (same images and views), weight 1.
- ``raw-ext``: the extended student on the ground truth only, weight 1.
- ``sag``: a single-sequence student whose layers are supervised by ``(1/N) Σ_k Y_t^k W_a^k``
  (Eq. 5) instead of SA, with learned W_a (optimised with the student); TA and GT as in ``ka``.

Baselines for tasks from several datasets (every image annotated only for its source's categories),
each a plain DETR on the union of the sources' images, ground-truth weight 1:

- ``raw`` is the naive merge: a category an image's source does not label is background there.
- ``raw-partial``: DETR with a partial-label loss: ``gt_loss: mask`` (the default) or ``marginal``.
- ``pseudo``: DETR on the ground truth plus the teachers' confident predictions (cached or online) of the
  categories each image lacks, as hard labels (``gt_loss: pseudo-gt``; autodistill-style).

``gt_loss`` (:data:`~kacli.losses.ground_truth.GT_LOSSES`) is the ground-truth loss of ``ka``,
``sag`` and ``raw-ext``; on images complete for every category (one dataset split by category,
the paper's setting) every mode gives the same losses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from kacli.config import ConfigValueError, apply_overrides, config_to_dict, load_config
from kacli.data.transforms import AugConfig
from kacli.engine.config import TrainConfig
from kacli.errors import KacliError
from kacli.fsutil import load_yaml
from kacli.losses.ground_truth import GT_LOSSES
from kacli.models.config import ModelConfig
from kacli.runconfig import RUN_PRESETS

TRAINING_METHODS = ("ka", "raw", "raw-ext", "sag", "raw-partial", "pseudo")
# Methods training a plain DETR on ground truth alone (weight 1), each with the ground-truth losses
# that define it (the first when the configuration names none).
PLAIN_DETR_GT_LOSSES = {"raw": ("none",), "raw-partial": ("mask", "marginal"), "pseudo": ("pseudo-gt",)}
# The ground-truth loss of the other methods when the configuration names none.
DEFAULT_GT_LOSS = "mask"


# -- configuration ---------------------------------------------------------------------------------


@dataclass
class SAConfig:
    """Sequence-level amalgamation (Eq. 2).

    Attributes:
        enabled: use L_seq (``--no-sa`` turns it off).
        normalize: standardise every channel with mini-batch statistics over valid tokens.
        stats: whose statistics standardise the student: ``own`` — every sequence by its own
            (the paper, Sec. IV-A2: "all the sequences are normalized independently"), or
            ``teacher`` — student and teacher with the teacher's (one affine map, so the loss is 0
            exactly when the student equals the teacher).
        reduction: ``element`` (default) divides each layer's squared error by the number of valid
            tokens and by d (a mean over elements, on the scale of DETR's losses); ``token`` by the
            number of valid tokens only; ``sum`` is Eq. 2's plain squared Frobenius norm.
    """

    enabled: bool = True
    normalize: bool = True
    stats: Literal["own", "teacher"] = "own"
    reduction: Literal["element", "token", "sum"] = "element"


@dataclass
class TAConfig:
    """Task-level amalgamation (Eq. 9–11); weights follow UP-DETR (class 1, L1 5, GIoU 2).

    Attributes:
        enabled: use L_task (``--no-ta`` turns it off).
        alpha: matching-cost weights (KL, L1, GIoU) of Eq. 10.
        alpha_conf: α3, the confidence bonus in the matching cost.
        beta_kl, beta_l1, beta_giou: loss weights of Eq. 11.
        threshold: teacher predictions less confident than this are dropped.
        topk: keep at most this many teacher predictions per image (null: all).
        temperature: softmax temperature of the KL terms.
        noobj_weight: weight of the term that sends the student's queries matched to no teacher
            prediction to "no object" (cross-entropy, divided like the pair terms by the matched
            pairs of the batch); 0 leaves them untaught by TA, as Eq. 11 alone does.
    """

    enabled: bool = True
    alpha: tuple[float, float, float] = (1.0, 5.0, 2.0)
    alpha_conf: float = 1.0
    beta_kl: float = 1.0
    beta_l1: float = 5.0
    beta_giou: float = 2.0
    threshold: float = 0.1
    topk: int | None = None
    temperature: float = 1.0
    noobj_weight: float = 0.1

    def __post_init__(self):
        for name in ("alpha_conf", "beta_kl", "beta_l1", "beta_giou", "threshold", "noobj_weight"):
            if getattr(self, name) < 0:
                raise ConfigValueError(name, f"must not be negative, got {getattr(self, name)}")
        if any(a < 0 for a in self.alpha):
            raise ConfigValueError("alpha", f"weights must not be negative, got {list(self.alpha)}")
        if self.temperature <= 0:
            raise ConfigValueError("temperature", f"must be positive, got {self.temperature}")
        if self.topk is not None and self.topk < 1:
            raise ConfigValueError("topk", f"must be at least 1 (or null for all), got {self.topk}")


@dataclass
class AmalgamateConfig:
    """What ``kacli amalgamate`` reads from ``--config`` (and the command-line overrides).

    ``model``, ``aug`` and ``train`` default to the teachers' (the first teacher's architecture and
    training settings as the cache records them, and the cache's augmentation; see
    :func:`kacli.cache.schema.teacher_settings`), so a config file only names what differs.
    From a cache ``aug`` matters only for validation (``eval_size``, ``max_size``): the training
    views are the cached ones; with the teachers run online it also draws every training view.

    Attributes:
        method: ``ka``, ``raw``, ``raw-ext``, ``sag``, ``raw-partial`` or ``pseudo`` (see the module
            docstring).
        gt_loss: the ground-truth loss on partially annotated images: ``none``, ``mask``,
            ``marginal`` or ``pseudo-gt`` (:mod:`kacli.losses.ground_truth`); null: the method's
            own (``mask`` for ``ka``, ``sag`` and ``raw-ext``; ``raw``, ``raw-partial`` and ``pseudo``
            are defined by theirs: none, mask or marginal (default mask), pseudo-gt).
        pseudo_threshold: ``pseudo-gt``: a teacher prediction becomes a hard label when its class
            probability reaches this.
        pseudo_iou: ``pseudo-gt``: IoU above which added boxes of one class are duplicates.
        compress: sequence compression of the extended student (``ka``, ``raw-ext``).
        compress_seed: seed of ``random`` compression at evaluation.
        compress_guide: the fraction of the epochs, from the start, in which ``redundancy`` compression
            picks the kept tokens from the teachers' projected sequences X_T; the remaining epochs
            pick them from the student's own X_S, as evaluation does. 1.0 (the default) is the
            paper's rule (X_T throughout training). The paper guides with X_T "because the student
            has not converged yet"; once it has, training on its own selection removes the mismatch
            between the tokens it was trained on and those it is evaluated on (docs/DEMO.md, "Design
            decisions").
        lambda_seq, lambda_task, lambda_d: Eq. 12's weights of L_seq, L_task and the ground-truth loss.
        eos_coef: "no object" class weight of the ground-truth criterion.
        proj_init: the extended student's N input projections: ``independent`` random
            initialisations (the official code's one projection to N·d channels) or ``copies`` of one.
        sag_init: SAG's W_a: ``random`` (the paper learns it "from scratch") or ``identity``.
    """

    method: Literal["ka", "raw", "raw-ext", "sag", "raw-partial", "pseudo"] = "ka"
    gt_loss: Literal["none", "mask", "marginal", "pseudo-gt"] | None = None
    pseudo_threshold: float = 0.5
    pseudo_iou: float = 0.7
    compress: Literal["none", "redundancy", "isometric", "random"] = "none"
    compress_seed: int = 0
    compress_guide: float = 1.0
    lambda_seq: float = 1.0
    lambda_task: float = 1.0
    lambda_d: float = 0.1
    eos_coef: float = 0.1
    proj_init: Literal["independent", "copies"] = "independent"
    sag_init: Literal["random", "identity"] = "random"
    sa: SAConfig = field(default_factory=SAConfig)
    ta: TAConfig = field(default_factory=TAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not 0.0 <= self.compress_guide <= 1.0:
            raise ConfigValueError("compress_guide", f"is a fraction of the epochs in [0, 1], got {self.compress_guide}")
        for name in ("lambda_seq", "lambda_task", "lambda_d", "eos_coef"):
            if getattr(self, name) < 0:
                raise ConfigValueError(name, f"must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.pseudo_threshold <= 1.0:
            raise ConfigValueError("pseudo_threshold", f"is a probability in [0, 1], got {self.pseudo_threshold}")
        if not 0.0 < self.pseudo_iou <= 1.0:
            raise ConfigValueError("pseudo_iou", f"is an IoU in (0, 1], got {self.pseudo_iou}")

    @property
    def plain_detr(self) -> bool:
        """The method trains a plain DETR on ground truth (``raw``, ``raw-partial``, ``pseudo``)."""
        return self.method in PLAIN_DETR_GT_LOSSES

    @property
    def ground_truth_loss(self) -> str:
        """The ground-truth loss mode this run trains with (see ``gt_loss``)."""
        own = PLAIN_DETR_GT_LOSSES.get(self.method)
        if own is not None:
            return self.gt_loss if self.gt_loss in own else own[0]
        return self.gt_loss or DEFAULT_GT_LOSS

    @property
    def extended(self) -> bool:
        """The student has one part per teacher (``ka``, ``raw-ext``)."""
        return self.method in ("ka", "raw-ext")


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_amalgamate_config(
    source: str | Path | Mapping | None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> AmalgamateConfig:
    """``--config`` over the teachers' settings, then the command-line overrides.

    Args:
        source: a YAML file, a mapping, a run preset name of train-teacher (``tiny``,
            ``detr-r50``: its model, aug and train replace the teachers'), or None.
        overrides: dotted keys (``{"train.epochs": 3, "lambda_d": 0}``); None values are skipped.
        base: ``{"model": ..., "aug": ..., "train": ...}`` mappings the file's sections are merged
            onto (the teachers' settings); when given, the result must name a model.

    Raises:
        KacliError: unknown key, wrong type or out-of-range value (naming the file and key).
    """

    merged: dict = copy.deepcopy(dict(base or {}))
    where: Any = None
    if isinstance(source, str) and source in RUN_PRESETS:
        merged = _deep_merge(merged, config_to_dict(RUN_PRESETS[source]))
    elif isinstance(source, Mapping):
        merged = _deep_merge(merged, source)
    elif source is not None:
        where = Path(source)
        if not where.exists():
            raise KacliError(f"no such config file, and not a preset name (presets: {', '.join(RUN_PRESETS)})", where)
        data = load_yaml(where)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise KacliError(f"a config must be a mapping of keys, got {type(data).__name__}", where)
        merged = _deep_merge(merged, data)
    if base is not None and "model" not in merged:
        raise KacliError(
            "the student's architecture is unknown: the teachers' checkpoints are no longer where the cache says; "
            "give the student's model (d_model and enc_layers as the teachers') under 'model:' in --config", where
        )
    try:
        cfg = load_config(merged, AmalgamateConfig)
    except KacliError as e:
        raise KacliError(e.message, where) from None
    cfg = apply_overrides(cfg, overrides or {})
    cfg.model.validate(where)
    return cfg


# -- checks ------------------------------------------------------------------------------------------


def check_method(cfg: AmalgamateConfig, num_teachers: int, layers: list[str],
                 present: Sequence[Sequence[bool]] | None = None) -> None:
    """Refuse configurations that cannot train what they say (one-line KacliError). ``present``
    (N_s, L): which sequence teacher gives which of ``layers`` (None: all of them)."""
    sequences = cfg.method in ("ka", "sag") and cfg.sa.enabled and cfg.lambda_seq > 0
    if sequences and present is not None and not all(all(row) for row in present):
        what = "--method sag" if cfg.method == "sag" else f"--compress {cfg.compress}" if cfg.compress != "none" else None
        common = [name for j, name in enumerate(layers) if all(row[j] for row in present)]
        if what is not None:
            hint = (f"cache only the layers they all give (cache-teachers --layers {','.join(common)}, then "
                    "amalgamate --cache)" if common else "no layer is given by all of them")
            raise KacliError(f"{what} needs every teacher's sequence at every cached layer, but a teacher gives only "
                             f"some (an RT-DETR-family folder: the last encoder layer): {hint}")
    if cfg.method == "ka":
        seq = cfg.sa.enabled and cfg.lambda_seq > 0
        task = cfg.ta.enabled and cfg.lambda_task > 0
        if not (seq or task or cfg.lambda_d > 0):
            raise KacliError(
                "--method ka with sequence- and task-level amalgamation both off (or weighted 0) and ground-truth "
                "weight 0 has nothing to learn from"
            )
    if cfg.compress != "none":
        if not cfg.extended:
            raise KacliError(f"--compress {cfg.compress} applies to the extended student (--method ka or raw-ext), "
                             f"not --method {cfg.method}")
        if num_teachers < 2:
            raise KacliError(f"--compress {cfg.compress} needs at least 2 teachers with sequences (a multi-scale "
                             f"transformers folder has none), got {num_teachers}, so there is nothing to compress")
    if cfg.method == "ka" and cfg.compress == "redundancy" and cfg.compress_guide > 0 and "proj" not in layers:
        raise KacliError("redundancy compression chooses tokens from the teachers' projected sequences, but the "
                         f"cache holds only layers {', '.join(layers)} (re-cache with the 'proj' layer)")
    own = PLAIN_DETR_GT_LOSSES.get(cfg.method)
    if own is not None and cfg.gt_loss is not None and cfg.gt_loss not in own:
        raise KacliError(f"--method {cfg.method} is DETR with the ground-truth loss {' or '.join(map(repr, own))}; "
                         f"gt_loss {cfg.gt_loss!r} would make it another method (use --method ka, sag or raw-ext "
                         "to choose gt_loss)")
    if cfg.method == "sag" and cfg.sa.enabled is False:
        raise KacliError("--method sag is sequence supervision; it cannot run with --no-sa")
    if cfg.model.classifier == "sigmoid" and cfg.ta.temperature != 1.0:
        raise KacliError(f"ta.temperature {cfg.ta.temperature} softens a softmax; the student (model.arch "
                         f"{cfg.model.arch}) has a sigmoid classifier, which takes temperature 1 only")


__all__ = [
    "AmalgamateConfig",
    "DEFAULT_GT_LOSS",
    "PLAIN_DETR_GT_LOSSES",
    "SAConfig",
    "TAConfig",
    "TRAINING_METHODS",
    "check_method",
    "load_amalgamate_config",
]
