"""The kacli checkpoint format: tensors and JSON-able metadata only.

A checkpoint is one dict (see docs/ARCHITECTURE.md):

    format       "kacli-checkpoint/1"
    kind         "detr" (a teacher or the raw baseline) | "student"
    arch         the model's architecture (ModelConfig as a dict; the student adds its own fields)
    label_map    {"ids": [category ids], "names": [category names]}; class k of the model is ids[k]
    task         the task name a teacher was trained for, or None
    model        the state_dict
    config       the full run configuration (dict)
    inputs       {"tasks.yaml": sha256, ...} provenance of what the run read
    train_state  {"epoch", "optimizer", "scheduler", "scaler", "run_id", "best", "rng"}, only in run checkpoints
    meta         free-form JSON-able extras (method, cache provenance, ...)

Everything loads with ``torch.load(weights_only=True)``: a checkpoint is untrusted input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kacli.errors import KacliError
from kacli.fsutil import atomic_path
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR
from kacli.models.student import Student
from kacli.models.torchfile import torch_load_untrusted

FORMAT = "kacli-checkpoint/1"
KINDS = ("detr", "student")


def save_checkpoint(path: str | Path, ckpt: dict[str, Any], *, force: bool | None = None) -> Path:
    """Write ``ckpt`` atomically (temporary name, then rename; ``force`` as in
    :func:`kacli.fsutil.atomic_file`). A full disk is one line naming ``path``."""
    missing = [k for k in ("kind", "arch", "label_map", "model") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    data = {"format": FORMAT, "task": None, "config": {}, "inputs": {}, "meta": {}}
    data.update(ckpt)
    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(data, f)  # through a Python file, so that a failing write is the system's OSError
        except RuntimeError as e:  # torch's zip writer hides that OSError behind its own error on closing
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    return Path(path)


def resolve_checkpoint_path(path: str | Path, prefer: str = "best.pt") -> Path:
    """A checkpoint file, or a run directory (its ``best.pt``, else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in (prefer, "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        if (p / "config.json").is_file():
            raise KacliError("is a transformers model folder, not a kacli checkpoint (eval, predict and the teachers "
                             "take one; kacli import-checkpoint converts DETR and Conditional DETR)", p)
        raise KacliError("run folder holds no best.pt or last.pt", p)
    if not p.exists():
        raise KacliError("checkpoint not found", p)
    return p


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """Load and check a kacli checkpoint (file or run directory)."""
    p = resolve_checkpoint_path(path)
    data = torch_load_untrusted(p)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = ""
        if isinstance(data, dict) and ("model" in data or any(str(k).startswith("backbone.") for k in data)):
            hint = " (a facebookresearch/detr or HF checkpoint? convert it with `kacli import-checkpoint`)"
        raise KacliError(f"not a kacli checkpoint{hint}", p)
    for key in ("kind", "arch", "label_map", "model"):
        if key not in data:
            raise KacliError(f"checkpoint lacks '{key}'", p)
    if data["kind"] not in KINDS:
        raise KacliError(f"unknown checkpoint kind {data['kind']!r}", p)
    if kind is not None and data["kind"] != kind:
        raise KacliError(f"expected a {kind} checkpoint, found a {data['kind']} one", p)
    lm = data["label_map"]
    if not isinstance(lm, dict) or len(lm.get("ids", [])) != len(lm.get("names", [])) or not lm.get("ids"):
        raise KacliError("checkpoint has a malformed label map", p)
    data["path"] = str(p)
    return data


def build_model(ckpt: dict[str, Any], *, load_weights: bool = True) -> torch.nn.Module:
    """Instantiate the model a checkpoint describes (and load its weights)."""

    num_classes = len(ckpt["label_map"]["ids"])
    if ckpt["kind"] == "detr":
        model = DETR(ModelConfig.from_dict(ckpt["arch"]), num_classes)
    else:
        model = Student.from_arch(ckpt["arch"], num_classes)
    if load_weights:
        load_weights_into(model, ckpt["model"], ckpt.get("path"))
        nonfinite = [k for k, v in ckpt["model"].items()
                     if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if nonfinite:
            raise KacliError(f"weights hold NaN or infinite values ({len(nonfinite)} tensors: "
                             f"{', '.join(nonfinite[:2])}); the model cannot be used", ckpt.get("path"))
    return model


def load_weights_into(model: torch.nn.Module, state: Any, path: str | Path | None, what: str = "weights") -> None:
    """``model.load_state_dict(state)``, with keys that are missing or unexpected and tensors of the
    wrong shape refused in one line naming ``path`` (torch's own error is a page long)."""
    if not isinstance(state, dict):
        raise KacliError(f"{what} are not a state dict", path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise KacliError(
            f"{what} do not fit the architecture (missing {len(missing)}: {', '.join(missing[:3])}; "
            f"unexpected {len(extra)}: {', '.join(extra[:3])})",
            path,
        )
    wrong = [f"{k} {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
             f"for {tuple(v.shape)}" for k, v in own.items()
             if not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise KacliError(f"{what} do not fit the architecture (wrong shape {len(wrong)}: {'; '.join(wrong[:2])})", path)
    model.load_state_dict(state)
