"""Training the student from the images and the teacher cache (``kacli amalgamate``, Sec. III).

No teacher runs here: every teacher output the losses need (projected sequence and encoder layers,
class logits and boxes) comes from the cache written by ``cache-teachers``, for exactly the view of
the image the student sees (the cache replays it).

Methods (:data:`METHODS`):

- ``ka``: the extended student (one projection per teacher, decoupled encoder, optional
  compression) trained with Eq. 12: ``λ_seq·L_seq + λ_task·L_task + λ_d·L_d``. L_seq is the SA loss
  (Eq. 2) over the cached layers (the projection and the encoder layers), L_task the TA loss
  (Eq. 9–11) against the pooled teacher predictions, L_d DETR's set criterion on the ground truth
  over the union label set.
- ``raw``: a plain DETR on the ground truth only (same images and views), weight 1.
- ``raw-ext``: the extended student on the ground truth only, weight 1.
- ``sag``: a single-sequence student whose layers are supervised by ``(1/N) Σ_k Y_t^k W_a^k``
  (Eq. 5) instead of SA, with learned W_a (optimised with the student); TA and GT as in ``ka``.

Every loss term goes into ``metrics.jsonl`` (the trainer logs every key of the loss dict):
``loss_seq``, ``loss_task``, ``loss_d`` (unweighted), their parts (``sa_proj``, ``sa_enc1``, …,
``loss_ta_kl``, …, ``loss_ce``, …) and ``total``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from kacli.config import ConfigValueError, TrainConfig, apply_overrides, config_to_dict, load_config
from kacli.data.transforms import AugConfig
from kacli.errors import KacliError
from kacli.losses.criterion import SetCriterion
from kacli.losses.matcher import HungarianMatcher
from kacli.losses.sequence import SAGProjection, sa_loss, sag_loss
from kacli.losses.task import TaskAmalgamationLoss
from kacli.models.backbone import backbone_stride
from kacli.models.config import ModelConfig

METHODS = ("ka", "raw", "raw-ext", "sag")
COMPRESSIONS = ("none", "redundancy", "isometric", "random")


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
            exactly when the student equals the teacher). docs/DEMO.md measures both.
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

    ``model``, ``aug`` and ``train`` default to the teachers' (their checkpoints' architecture and
    training settings, the cache's augmentation), so a config file only names what differs.
    ``aug`` matters only for validation (``eval_size``, ``max_size``): training views come from the cache.

    Attributes:
        method: ``ka``, ``raw``, ``raw-ext`` or ``sag`` (see the module docstring).
        compress: sequence compression of the extended student (``ka``, ``raw-ext``).
        compress_seed: seed of ``random`` compression at evaluation.
        compress_guide: the fraction of the epochs, from the start, in which ``redundancy`` compression
            picks the kept tokens from the teachers' projected sequences X_T; the remaining epochs
            pick them from the student's own X_S, as evaluation does. 1.0 (the default) is the
            paper's rule (X_T throughout training). The paper guides with X_T "because the student
            has not converged yet"; once it has, training on its own selection removes the mismatch
            between the tokens it was trained on and those it is evaluated on (docs/DEMO.md).
        lambda_seq, lambda_task, lambda_d: Eq. 12's weights of L_seq, L_task and the ground-truth loss.
        eos_coef: "no object" class weight of the ground-truth criterion.
        proj_init: the extended student's N input projections: ``independent`` random
            initialisations (the official code's one projection to N·d channels) or ``copies`` of one.
        sag_init: SAG's W_a: ``random`` (the paper learns it "from scratch") or ``identity``.
    """

    method: Literal["ka", "raw", "raw-ext", "sag"] = "ka"
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
    from kacli.fsutil import load_yaml
    from kacli.teacher import RUN_PRESETS

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


def check_method(cfg: AmalgamateConfig, num_teachers: int, layers: list[str]) -> None:
    """Refuse configurations that cannot train what they say (one-line KacliError)."""
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
            raise KacliError(f"--compress {cfg.compress} needs at least 2 teachers; the cache has {num_teachers}, "
                             "so there is nothing to compress")
    if cfg.method == "ka" and cfg.compress == "redundancy" and cfg.compress_guide > 0 and "proj" not in layers:
        raise KacliError("redundancy compression chooses tokens from the teachers' projected sequences, but the "
                         f"cache holds only layers {', '.join(layers)} (re-cache with the 'proj' layer)")
    if cfg.method == "sag" and cfg.sa.enabled is False:
        raise KacliError("--method sag is sequence supervision; it cannot run with --no-sa")


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


# -- the objective -----------------------------------------------------------------------------------


def layer_outputs(out: dict, layers: list[str]) -> list[torch.Tensor]:
    """The student's tensors for the cached layer names: ``proj`` → ``enc_proj``, ``encI`` →
    ``enc_layers[I-1]``.

    A compressed student's ``proj`` is all N projected parts (``proj_parts``, B×N×n×d), not only the
    kept tokens: compression happens after the projection, so the whole extended X_S exists, and at
    evaluation the kept parts are chosen from X_S's redundancy. Supervising only the kept tokens
    leaves the others free, and a selection made from them disagrees with the teachers' one the
    student was trained on (docs/DEMO.md measures the cost)."""
    picked = []
    for name in layers:
        if name == "proj":
            picked.append(out.get("proj_parts", out["enc_proj"]))
        elif name.startswith("enc") and name[3:].isdigit():
            picked.append(out["enc_layers"][int(name[3:]) - 1])
        else:
            raise ValueError(f"unknown cached layer name {name!r}")
    return picked


class AmalgamationObjective(nn.Module):
    """The loss of one method, as the trainer calls it: ``(model, batch, device) → dict``.

    The batch is ``collate_cached``'s ``(images (B,3,H,W), mask (B,H,W), targets, teacher)`` with
    ``teacher`` = ``{"seqs" (B,N,L,n,d), "token_mask" (B,n), "logits" [(B,Q_t,C_t+1)],
    "boxes" [(B,Q_t,4)]}`` (``raw`` and ``raw-ext`` ignore ``teacher``; it may be None).

    Args:
        cfg: the run's configuration.
        num_classes: C, the union label set's size.
        num_teachers: N.
        layers: names of the cached layers (``proj``, ``enc1``, …), in the order of ``seqs``' L axis.
        class_index: per teacher, the student class index of each of its classes.
        sag_proj: the SAG projections W_a (``sag`` only); optimise its parameters with the model.
    """

    def __init__(self, cfg: AmalgamateConfig, num_classes: int, num_teachers: int, layers: list[str],
                 class_index: list[torch.Tensor], sag_proj: SAGProjection | None = None):
        super().__init__()
        self.cfg = cfg
        self.method = cfg.method
        self.num_teachers = num_teachers
        self.layers = list(layers)
        self.class_index = [torch.as_tensor(c, dtype=torch.long) for c in class_index]
        self.criterion = SetCriterion(num_classes, HungarianMatcher(), eos_coef=cfg.eos_coef)
        ta = cfg.ta
        self.ta = TaskAmalgamationLoss(
            num_classes, alpha=tuple(ta.alpha), alpha_conf=ta.alpha_conf, beta_kl=ta.beta_kl, beta_l1=ta.beta_l1,
            beta_giou=ta.beta_giou, threshold=ta.threshold, topk=ta.topk, temperature=ta.temperature,
            noobj_weight=ta.noobj_weight,
        )
        self.use_gt = cfg.method in ("raw", "raw-ext") or cfg.lambda_d > 0
        self.use_seq = cfg.method in ("ka", "sag") and cfg.sa.enabled and cfg.lambda_seq > 0
        self.use_task = cfg.method in ("ka", "sag") and cfg.ta.enabled and cfg.lambda_task > 0
        if cfg.method == "sag" and sag_proj is None:
            raise ValueError("method sag needs its SAGProjection")
        self.sag_proj = sag_proj
        self.proj_layer = self.layers.index("proj") if "proj" in self.layers else None
        self.guided = cfg.compress_guide > 0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based): ``redundancy`` compression is guided
        by the teachers' X_T while ``epoch < round(compress_guide · epochs)``."""
        self.guided = epoch < round(self.cfg.compress_guide * epochs)

    @property
    def needs_teacher(self) -> bool:
        """Whether the batch must carry the teachers' outputs (a loss reads them, or ``ka``'s
        redundancy compression chooses tokens from the teachers' projected sequences)."""
        picks = (self.method == "ka" and self.cfg.compress == "redundancy" and self.proj_layer is not None
                 and self.cfg.compress_guide > 0)
        return self.use_seq or self.use_task or picks

    def forward(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        from kacli.cache.quant import dequantize_teacher
        from kacli.engine.train import to_device

        images, mask, targets, teacher = batch
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = to_device([{"boxes": t["boxes"], "labels": t["labels"]} for t in targets], device)
        teacher = to_device(teacher, device) if (teacher is not None and self.needs_teacher) else None
        teacher = dequantize_teacher(teacher)  # int8 caches: float sequences, made on the device
        bare = model.module if hasattr(model, "module") else model
        compressed = getattr(bare, "compress", "none") != "none"
        if compressed and self.guided and teacher is not None and self.proj_layer is not None:
            out = model(images, mask, teacher_proj=teacher["seqs"][:, :, self.proj_layer])
        else:
            out = model(images, mask)

        losses: dict[str, torch.Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        if self.use_gt:
            gt = self.criterion(out, targets)
            gt.pop("class_error", None)
            gt_total = gt.pop("total")
            losses.update(gt)
            losses["loss_d"] = gt_total
            weight = 1.0 if self.method in ("raw", "raw-ext") else self.cfg.lambda_d
            total = total + weight * gt_total
        if self.use_seq:
            seq_total, parts = self.sequence_loss(out, teacher)
            losses.update(parts)
            losses["loss_seq"] = seq_total
            total = total + self.cfg.lambda_seq * seq_total
        if self.use_task:
            ta = self.ta(out, teacher["logits"], teacher["boxes"], self.class_index)
            ta_total = ta.pop("total")
            losses.update(ta)
            losses["loss_task"] = ta_total
            total = total + self.cfg.lambda_task * ta_total
        losses["total"] = total
        return losses

    def sequence_loss(self, out: dict, teacher: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SA (``ka``) or SAG (``sag``) over the cached layers; see :mod:`kacli.losses.sequence`."""
        seqs = teacher["seqs"]  # (B, N, L, n, d)
        if seqs.shape[1] != self.num_teachers or seqs.shape[2] != len(self.layers):
            raise ValueError(f"teacher sequences {tuple(seqs.shape)} do not have N={self.num_teachers} teachers "
                             f"and L={len(self.layers)} layers")
        n = out["enc_mask"].shape[1]
        if seqs.shape[3] != n or teacher["token_mask"].shape[1] != n:
            raise ValueError(f"cached token grid has {seqs.shape[3]} tokens, the student's feature map {n} "
                             f"({out['enc_hw'][0]}x{out['enc_hw'][1]})")
        mask = out["enc_mask"] | teacher["token_mask"].to(torch.bool)
        student = layer_outputs(out, self.layers)
        targets = [seqs[:, :, j] for j in range(len(self.layers))]
        names = [f"sa_{name}" for name in self.layers]
        if self.method == "sag":
            student = [s.squeeze(1) if s.dim() == 4 else s for s in student]
            return sag_loss(student, targets, mask, self.sag_proj, normalize=self.cfg.sa.normalize,
                            names=[f"sag_{name}" for name in self.layers], reduction=self.cfg.sa.reduction,
                            stats=self.cfg.sa.stats)
        return sa_loss(student, targets, mask, self.num_teachers, normalize=self.cfg.sa.normalize, names=names,
                       index=out.get("part_idx"), reduction=self.cfg.sa.reduction, stats=self.cfg.sa.stats)


# -- building the run --------------------------------------------------------------------------------


def build_student(cfg: AmalgamateConfig, num_classes: int, num_teachers: int) -> nn.Module:
    """The model ``cfg.method`` trains: DETR (``raw``), a 1-part student (``sag``), the N-part one."""
    from kacli.models.detr import DETR
    from kacli.models.student import Student

    if cfg.method == "raw":
        return DETR(cfg.model, num_classes)
    if cfg.method == "sag":
        return Student(cfg.model, num_classes, 1)
    return Student(cfg.model, num_classes, num_teachers, cfg.compress, cfg.compress_seed, proj_init=cfg.proj_init)


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
    from kacli.data.dataset import collate

    images, mask, targets = collate(batch, size_divisibility=stride)
    return images, mask, targets, None


def teacher_settings(attrs: dict) -> dict:
    """``{"model", "aug", "train"}`` of the teachers: the first teacher checkpoint's architecture
    and training settings (when the file is still there) and the cache's augmentation."""
    from kacli.models.checkpoint import torch_load_untrusted

    base: dict = {}
    teachers = attrs.get("teachers") or []
    ck_path = Path(teachers[0]["checkpoint"]) if teachers and teachers[0].get("checkpoint") else None
    if ck_path is not None and ck_path.is_file():
        ck = torch_load_untrusted(ck_path)
        if isinstance(ck, dict) and isinstance(ck.get("arch"), dict):
            base["model"] = dict(ck["arch"])
            train = (ck.get("config") or {}).get("train")
            if isinstance(train, dict):
                base["train"] = dict(train)
    if isinstance(attrs.get("aug"), dict):
        base["aug"] = dict(attrs["aug"])
    return base


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
    from kacli.cache import schema
    from kacli.cache.reader import TeacherCache, cache_manifest, collate_cached
    from kacli.engine.distributed import init_distributed
    from kacli.engine.train import Trainer, TrainSetup
    from kacli.fsutil import sha256_file
    from kacli.engine.rundir import RunDir
    from kacli.teacher import make_validator

    cache_path = Path(cache_path)
    with schema.open_h5(cache_path, "r") as f:
        attrs = dict(schema.validate(f, cache_path, require_complete=True).attrs)

    # The manifest: the one given must be the one the cache was made from.
    manifest = cache_manifest(attrs, cache_path, tasks_path)

    teachers = list(attrs.get("teachers") or [])
    num_teachers = len(teachers)
    cached_layers = list(attrs["layers"])
    d_model = int(attrs["d_model"])
    enc_layers = int(attrs["enc_layers"])

    if cfg is None:
        cfg = load_amalgamate_config(config, overrides, teacher_settings(attrs))
    elif overrides:
        cfg = apply_overrides(cfg, overrides)
    if device is not None:
        cfg = apply_overrides(cfg, {"train.device": device})
    check_method(cfg, num_teachers, cached_layers)

    label_map = {"ids": [int(i) for i in attrs["label_map"]["ids"]], "names": list(attrs["label_map"]["names"])}
    num_classes = len(label_map["ids"])
    check_architecture(cfg.model, d_model, enc_layers, attrs.get("stride"), backbone_stride(cfg.model), cache_path)
    torch.manual_seed(cfg.train.seed)
    model = build_student(cfg, num_classes, num_teachers)

    # Only the cached layers a loss reads are loaded.
    uses_seq = cfg.method in ("ka", "sag") and cfg.sa.enabled and cfg.lambda_seq > 0
    if uses_seq:
        layers = cached_layers
    elif cfg.compress == "redundancy" and cfg.method == "ka":
        layers = ["proj"]
    else:
        layers = cached_layers[:1]
    cache = TeacherCache(cache_path, layers=layers, tasks=manifest.path, dequantize=False)  # int8 travels as int8

    out = Path(out_dir)
    run_dir = RunDir(out, resume, force)  # checks only: out is replaced at the new run's first checkpoint
    if backbone_weights:
        from kacli.models.backbone import load_backbone_weights

        rep = load_backbone_weights(model.backbone, backbone_weights)
        log(f"backbone weights from {backbone_weights}: loaded {rep['loaded']} tensors")
    dist = init_distributed(cfg.train.device)

    sag_proj = SAGProjection(num_teachers, d_model, len(layers), init=cfg.sag_init) if cfg.method == "sag" else None
    objective = AmalgamationObjective(cfg, num_classes, num_teachers, layers, list(cache.class_index), sag_proj)
    if objective.needs_teacher:
        train_set, collate_fn = cache, collate_cached
    else:
        train_set, collate_fn = GroundTruthOnly(cache), functools.partial(collate_ground_truth, stride=cache.stride)

    evaluate = None
    if "val" in manifest.splits and cfg.train.eval_every > 0:
        evaluate = make_validator(manifest, label_map, cfg.aug, dist.device, cfg.train.batch_size)

    cache_sha = schema.content_id(cache.attrs, cache_path.stat().st_size)
    inputs = {"tasks.yaml": manifest.sha256, "cache": cache_sha}
    if backbone_weights:
        inputs["backbone_weights"] = sha256_file(backbone_weights)
    if cfg.method == "raw":
        kind, arch = "detr", cfg.model.to_dict()
    else:
        kind, arch = "student", model.arch_dict()
    meta = {
        "role": "student",
        "method": cfg.method,
        "compress": cfg.compress,
        "weights": {"lambda_seq": cfg.lambda_seq, "lambda_task": cfg.lambda_task, "lambda_d": cfg.lambda_d},
        "sa": config_to_dict(cfg.sa),
        "ta": config_to_dict(cfg.ta),
        "cache": {
            "path": str(cache_path.resolve()),
            "content_sha256": cache_sha,
            "teachers": [{"task": t.get("task"), "checkpoint": t.get("checkpoint"), "sha256": t.get("sha256")}
                         for t in teachers],
            "layers": layers,
        },
        "tasks_path": str(manifest.path),
    }
    t = cfg.train
    setup = TrainSetup(
        out_dir=out, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, lr_backbone=t.lr_backbone,
        weight_decay=t.weight_decay, lr_drop=t.lr_drop, clip_max_norm=t.clip_max_norm, seed=t.seed,
        workers=t.workers, eval_every=t.eval_every, amp=t.amp, ema=t.ema, tensorboard=t.tensorboard,
        checkpoint_base={"kind": kind, "arch": arch, "label_map": label_map, "task": None,
                         "config": config_to_dict(cfg), "inputs": inputs, "meta": meta},
        signature={"method": cfg.method, "cache": cache_sha, "tasks.yaml": manifest.sha256,
                   **{f"arch.{k}": v for k, v in arch.items()}},
        extra_modules=[sag_proj] if sag_proj is not None else [],
        log_name=f"amalgamate {cfg.method}",
        run_dir=run_dir,
        checkpoint_every=t.checkpoint_every,
    )
    trainer = Trainer(model, objective, train_set, collate_fn, setup, dist, evaluate=evaluate)
    result = trainer.fit(resume=resume)
    result.update(method=cfg.method, out=str(out))
    return result


__all__ = [
    "AmalgamateConfig",
    "AmalgamationObjective",
    "METHODS",
    "SAConfig",
    "TAConfig",
    "amalgamate",
    "build_student",
    "check_architecture",
    "check_method",
    "layer_outputs",
    "load_amalgamate_config",
]
