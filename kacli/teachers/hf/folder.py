"""A transformers object-detection folder: what one is, its config, classes and hash, and loading it
(offline, without remote code, from safetensors) as a checkpoint-like dict holding a
:class:`~kacli.teachers.hf.detector.TransformersDetector`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kacli.errors import KacliError
from kacli.fsutil import load_json, sha256_file
from kacli.teachers.hf.detector import TransformersDetector
from kacli.teachers.hf.rules import ImageRule

KIND = "transformers"
INSTALL_HINT = "transformers is not installed: pip install 'kacli[hf]'"

#: The families kacli documents (model_type → (name, classifier)); any other object-detection
#: model_type transformers knows loads too, with the sigmoid classifier checked at its first run.
FAMILIES: dict[str, tuple[str, str]] = {
    "detr": ("DETR", "softmax"),
    "conditional_detr": ("Conditional DETR", "sigmoid"),
    "dab-detr": ("DAB-DETR", "sigmoid"),
    "deformable_detr": ("Deformable DETR", "sigmoid"),
    "rt_detr": ("RT-DETR", "sigmoid"),
    "rt_detr_v2": ("RT-DETRv2", "sigmoid"),
    "d_fine": ("D-FINE", "sigmoid"),
    "deimv2": ("DEIMv2", "sigmoid"),
    "lw_detr": ("LW-DETR", "sigmoid"),
    "rf_detr": ("RF-DETR", "sigmoid"),
    "yolos": ("YOLOS", "softmax"),
    "table-transformer": ("Table Transformer", "softmax"),
}

#: Families whose encoder is DETR's kind: one sequence at one stride, layer by layer
#: (``encoder_hidden_states``: the input projection's output, then every layer's). Such a folder
#: teaches through SA too, when its width, depth and stride are the kacli teachers'.
SEQUENCE_FAMILIES = ("detr", "conditional_detr", "dab-detr")

#: Families with RT-DETR's hybrid encoder: one transformer layer set (AIFI) on the stride-32 level
#: only, then convolutional multi-scale fusion. transformers' ``encoder_hidden_states`` are that
#: level's input projection and the AIFI output (F5): F5 guides the student's last encoder layer,
#: when its width and stride are the kacli teachers'.
AIFI_FAMILIES = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")

#: Slot names that mean "no class here" (DETR's unused COCO ids).
UNNAMED = ("N/A", "")

CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_transformers_folder(path: str | Path) -> bool:
    """A folder with a ``config.json`` and no kacli checkpoint (``best.pt`` / ``last.pt``) in it."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and not any((p / n).is_file() for n in ("best.pt", "last.pt"))


def _read_json(path: Path, what: str) -> dict:
    """A JSON object file of the folder (:func:`kacli.fsutil.load_json`; anything else is refused)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise KacliError(f"{what} is not a JSON object", path)
    return data


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    return transformers


def detection_model_types() -> set[str]:
    """The object-detection model types the installed transformers maps (empty without it)."""
    if _transformers() is None:
        return set()
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    return set(MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES)


def folder_sha256(path: str | Path) -> str:
    """sha256 over the folder's config, image rules and weight files (name and content each)."""
    p = Path(path)
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(p)
                   if n in (CONFIG, PROCESSOR) or (n.startswith("model") and n.endswith((".safetensors", ".json"))))
    for n in names:
        if (p / n).is_file():
            h.update(n.encode() + b"\0" + sha256_file(p / n).encode() + b"\n")
    return h.hexdigest()


def read_folder_config(path: str | Path) -> dict:
    """The folder's ``config.json``, checked to be an object detector that runs without remote code."""
    p = Path(path)
    cfg = _read_json(p / CONFIG, CONFIG)
    if "auto_map" in cfg:
        raise KacliError("config.json asks for remote code (auto_map): kacli never runs code from a model folder "
                         "(trust_remote_code is never set)", p)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise KacliError("config.json has no model_type: not a transformers model folder", p)
    return cfg


def label_slots(cfg: Mapping[str, Any], path: Path) -> list[str | None]:
    """The name of each class slot (``config.id2label``; None for an unnamed slot)."""
    raw = cfg.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise KacliError("config.json has no id2label: the model's classes are unknown", path)
    try:
        pairs = {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise KacliError("config.json's id2label has a key that is not a class index", path) from None
    n = max(pairs) + 1
    if min(pairs) < 0 or n > 100_000:
        raise KacliError(f"config.json's id2label has class index {min(pairs) if min(pairs) < 0 else n - 1} out of range", path)
    names: list[str | None] = [None] * n
    for k, v in pairs.items():
        names[k] = None if not isinstance(v, str) or v.strip() in UNNAMED else v
    if not any(names):
        raise KacliError("config.json's id2label names no class", path)
    return names


def folder_label_map(names: list[str | None]) -> dict:
    """``{"ids", "names"}`` of the named slots (ids = slot indices, the model's class ids)."""
    named = [(k, n) for k, n in enumerate(names) if n is not None]
    return {"ids": [k for k, _ in named], "names": [n for _, n in named]}


@contextlib.contextmanager
def _offline():
    """Nothing downloads while a folder loads (a config naming a hub backbone would try)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:  # huggingface_hub reads the variable once, when imported: its flag is set too
        from huggingface_hub import constants as hub_constants
    except ImportError:
        hub_constants = None
    hub_saved = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = hub_saved


def load_transformers_folder(path: str | Path, *, build: bool = True) -> dict[str, Any]:
    """A transformers object-detection folder as a checkpoint-like dict: ``{"kind": "transformers",
    "path", "sha256", "family", "model_type", "classifier", "label_map" (named slots), "slots"
    (K), "num_queries", "rule" (ImageRule), "config" ({"aug": eval sizes} when the rule is
    DETR's), "transformers_version", "task": None, "model" (TransformersDetector; only with
    ``build``)}``.

    Raises KacliError (one line naming the folder or file) for a folder that is not an object
    detector transformers knows, asks for remote code, lacks its image rules or safetensors
    weights, or whose weights do not fit its config; and when transformers is not installed.
    """
    p = Path(path)
    if not p.is_dir() or not (p / CONFIG).is_file():
        raise KacliError("is not a transformers model folder (no config.json)", p)
    cfg = read_folder_config(p)
    model_type = cfg["model_type"]
    tf = _transformers()
    if tf is None:
        raise KacliError(INSTALL_HINT, p)
    if model_type not in detection_model_types():
        raise KacliError(f"is a {model_type!r} model, not an object detector transformers {tf.__version__} knows "
                         "(AutoModelForObjectDetection)", p)
    if not any((p / n).is_file() for n in WEIGHTS):
        other = [n for n in ("pytorch_model.bin", "tf_model.h5") if (p / n).is_file()]
        hint = f" ({other[0]} is not read: it can run code when loaded; save with safe_serialization)" if other else ""
        raise KacliError(f"holds no model.safetensors{hint}", p)
    if not (p / PROCESSOR).is_file():
        raise KacliError(f"holds no {PROCESSOR}: the model's image rules (size, normalisation) are unknown "
                         "(save its image processor with save_pretrained into the folder)", p)
    rule = _image_rule(p)
    names = label_slots(cfg, p / CONFIG)
    family, classifier = FAMILIES.get(model_type, (model_type, "sigmoid"))
    sequence = "encoder" if model_type in SEQUENCE_FAMILIES else "aifi" if model_type in AIFI_FAMILIES else None
    sa_note = _no_aifi(cfg) if sequence == "aifi" else None
    if sa_note:
        sequence = None
    sizes = rule.eval_sizes()
    info: dict[str, Any] = {
        "kind": KIND, "path": str(p), "sha256": folder_sha256(p), "family": family, "model_type": model_type,
        "classifier": classifier, "label_map": folder_label_map(names), "slots": len(names),
        "num_queries": int(cfg.get("num_queries") or cfg.get("num_detection_tokens") or 0), "rule": rule,
        "transformers_version": tf.__version__,
        "config": {"aug": {"eval_size": sizes[0], "max_size": sizes[1]}} if sizes else {}, "task": None,
        "sequence": sequence, "sa_note": sa_note,
    }
    if sequence == "encoder":  # the encoder's width and depth (measured too once the model is built)
        info["d_model"] = int(cfg.get("d_model") or cfg.get("hidden_size") or 0)
        info["enc_layers"] = int(cfg.get("encoder_layers") or 0)
    elif sequence == "aifi":  # the AIFI level's width (measured too once the model is built)
        info["d_model"] = int(cfg.get("encoder_hidden_dim") or 0)
    if build:
        model = TransformersDetector(_load_model(p, len(names)), rule, classifier, len(names), p, info["label_map"]["ids"])
        info["num_queries"] = _probe(model, p)  # what it gives, whatever its config says (two-stage models differ)
        if sequence:  # what its encoder gives: stride, width and how many sequences
            count, info["stride"], info["d_model"] = model.encoder_layout()
            if sequence == "encoder":
                info["enc_layers"] = count - 1
            if not info["stride"] or (sequence == "aifi" and count != 2):
                what = "one AIFI level's projection and output" if sequence == "aifi" else "one token grid"
                info["sequence"], info["sa_note"] = None, (
                    f"teaches through TA only: its encoder gives {count} sequences, not {what}")
        info["model"] = model
    return info


def _no_aifi(cfg: dict) -> str | None:
    """Why an RT-DETR-family config has no single AIFI level kacli reads (None: it has one, on the
    coarsest level, as every released RT-DETR, D-FINE and DEIMv2 has)."""
    levels = len(cfg.get("encoder_in_channels") or [0, 0, 0])
    if cfg.get("encoder_type", "hybrid") != "hybrid":
        return f"teaches through TA only: its {cfg.get('encoder_type')!r} encoder has no AIFI layer"
    if int(cfg.get("encoder_layers", 1) or 0) < 1:
        return "teaches through TA only: its hybrid encoder has no AIFI layer (encoder_layers 0)"
    if list(cfg.get("encode_proj_layers") or [levels - 1]) != [levels - 1]:
        return (f"teaches through TA only: its AIFI runs on levels {list(cfg['encode_proj_layers'])}; kacli reads one, "
                "the coarsest")
    return None


#: The resize keys a processor's size may hold (transformers' SizeDict).
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def _image_rule(p: Path) -> ImageRule:
    """The folder's image processor as transformers reads it (its class's defaults for what the file
    leaves out; an older file's ``"size": 800, "max_size": 1333`` as shortest and longest edge) →
    :class:`ImageRule`."""
    from transformers import AutoImageProcessor

    if "auto_map" in _read_json(p / PROCESSOR, PROCESSOR):
        raise KacliError(f"{PROCESSOR} asks for remote code (auto_map): kacli never runs code from a model folder", p)
    with _offline(), _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            proc = AutoImageProcessor.from_pretrained(p, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - one line for whatever transformers raises
            raise KacliError(f"transformers cannot read its image processor ({PROCESSOR}): {_first_line(e)}", p) from None
    size = getattr(proc, "size", None)
    if size is not None and not isinstance(size, dict):
        size = {k: getattr(size, k, None) for k in _SIZE_KEYS}
    data = {"do_resize": getattr(proc, "do_resize", True), "size": size,
            "do_rescale": getattr(proc, "do_rescale", True), "rescale_factor": getattr(proc, "rescale_factor", 1 / 255),
            "do_normalize": getattr(proc, "do_normalize", True), "image_mean": getattr(proc, "image_mean", None),
            "image_std": getattr(proc, "image_std", None)}
    return ImageRule.from_processor({k: v for k, v in data.items() if v is not None}, p / PROCESSOR)


def _probe(model: TransformersDetector, p: Path) -> int:
    """One blank image through the model, before anything is written: it must give class logits of
    its classifier's width and boxes; returns its query count."""
    try:
        out = model(torch.zeros(1, 3, 256, 256), torch.zeros(1, 256, 256, dtype=torch.bool))
    except KacliError:
        raise
    except Exception as e:  # noqa: BLE001 - a model transformers lists as a detector that is not a DETR
        raise KacliError(f"the model does not run as a DETR-family detector (logits and pred_boxes per query): "
                         f"{_first_line(e)}", p) from None
    return int(out["pred_logits"].shape[1])


def _load_model(p: Path, slots: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForObjectDetection

    with _offline(), _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' advice on CUDA kernels and head sizes
        try:
            config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=False)
            if getattr(config, "use_pretrained_backbone", False):
                config.use_pretrained_backbone = False  # the folder's weights hold the backbone: nothing downloads
            if int(getattr(config, "num_labels", slots)) != slots:
                raise KacliError(f"config.json has num_labels {config.num_labels} but id2label {slots} slots", p / CONFIG)
            model, info = AutoModelForObjectDetection.from_pretrained(
                p, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True)  # listed in the loading info, refused below
        except KacliError:
            raise
        except ImportError as e:
            raise KacliError(f"cannot build the model: {_first_line(e)}", p) from None
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
            raise KacliError(f"transformers cannot load the model: {_first_line(e)}", p) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])  # transformers leaves out the ones it ignores on purpose
    if missing or mismatched or unexpected:
        if missing:
            what = f"{len(missing)} tensors missing (e.g. {missing[0]})"
        elif mismatched:
            first = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
            what = f"{len(mismatched)} tensors of another shape (e.g. {first})"
        else:
            what = f"{len(unexpected)} tensors the config has no place for (e.g. {unexpected[0]})"
        raise KacliError(f"model.safetensors does not match config.json: {what}", p)
    model.eval().requires_grad_(False)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise KacliError(f"weights hold NaN or infinite values ({len(bad)} tensors: {bad[0]}); the model cannot be used", p)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own warnings (unused weights, processor defaults) stay out of kacli's output."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line[:300]


__all__ = ["CONFIG", "FAMILIES", "INSTALL_HINT", "KIND", "PROCESSOR", "SEQUENCE_FAMILIES", "UNNAMED", "WEIGHTS",
           "detection_model_types", "folder_label_map", "folder_sha256", "is_transformers_folder", "label_slots",
           "load_transformers_folder", "read_folder_config"]
