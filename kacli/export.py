"""Export a kacli checkpoint as a self-contained ``torch.export`` program, TorchScript or ONNX model.

The exported model (:class:`ExportWrapper`) takes

- ``images (B,3,H,W)`` float32, normalised with ImageNet mean/std (``kacli.data.transforms``'s
  evaluation view: shorter side resized, no padding needed for a single image), and
- ``mask (B,H,W)`` bool, True at padding (all False for unpadded images),

and returns, per query,

- ``scores (B,D)`` float32: the highest class probability (softmax over K+1, "no object" excluded;
  D = Q), or for a sigmoid classifier (Conditional DETR) the D = min(100, Q·K) highest (query,
  class) probabilities, descending (:mod:`kacli.models.postprocess`),
- ``labels (B,D)`` int64: that class as the **dataset's category id** (the label map is inside),
- ``boxes (B,D,4)`` float32: **normalised xyxy** in [0, 1] relative to each image's unpadded
  region; multiply by ``(w, h, w, h)`` of the original image to get pixels.

The label map goes with the model: ``export`` (.pt2) and TorchScript files carry
``label_map.json`` as an extra file (``torch.export.load(path, extra_files={"label_map.json": ""})``,
``torch.jit.load(path, _extra_files=...)``) and the category ids as the ``category_ids`` buffer;
ONNX files get a sidecar ``<out>.labels.json``.

- ``export``: :func:`torch.export.export` → an ``ExportedProgram`` saved with
  :func:`torch.export.save`; batch, height and width are dynamic (height and width from
  ``MIN_SIDE`` pixels: each side must give the backbone at least two feature rows/columns).
  Run it with ``torch.export.load(path).module()(images, mask)``. This is the format for today's
  PyTorch (AOTInductor, ExecuTorch); TorchScript is deprecated there and kept while torch ships it.
- ``torchscript``: ``torch.jit.trace``.
- ``onnx``: ``torch.onnx.export(dynamo=False)`` (opset 17) with dynamic batch, height and width.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import box_convert

from kacli.errors import KacliError
from kacli.fsutil import atomic_path, check_output_file
from kacli.models.checkpoint import build_model, load_checkpoint
from kacli.models.postprocess import class_scores

FORMATS = ("export", "torchscript", "onnx")
ONNX_OPSET = 17
MIN_SIDE, MAX_SIDE = 64, 16384  # pixels; the exported program's dynamic height and width range


class ExportWrapper(nn.Module):
    """A kacli model plus its label map: ``(images, mask) → (scores, labels, boxes)`` (module docstring)."""

    def __init__(self, model: nn.Module, category_ids: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("category_ids", torch.tensor([int(c) for c in category_ids], dtype=torch.int64))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B,3,H,W), mask (B,H,W) bool → scores (B,Q), labels (B,Q) int64 ids, boxes (B,Q,4) xyxy in [0,1]."""
        out = self.model(images, mask)
        scores, idx, query = class_scores(out["pred_logits"], self.model.classifier)
        labels = self.category_ids[idx]
        boxes = box_convert(out["pred_boxes"].float(), "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
        return scores, labels, boxes


def example_inputs(size: tuple[int, int] = (128, 160), batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch to trace with; the second image is padded at the bottom and right."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=g)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if batch > 1:
        mask[1:, h * 3 // 4 :, :] = True
        mask[1:, :, w * 3 // 4 :] = True
        images[1:].masked_fill_(mask[1:, None], 0.0)
    return images, mask


def build_wrapper(ckpt: dict[str, Any]) -> ExportWrapper:
    """The eval-mode wrapper of a loaded checkpoint (:func:`kacli.models.checkpoint.load_checkpoint`)."""

    model = build_model(ckpt)
    return ExportWrapper(model, ckpt["label_map"]["ids"]).eval()


def label_map_json(ckpt: dict[str, Any]) -> str:
    lm = ckpt["label_map"]
    return json.dumps(
        {
            "ids": [int(i) for i in lm["ids"]],
            "names": [str(n) for n in lm["names"]],
            "inputs": "images (B,3,H,W) float32 ImageNet-normalised; mask (B,H,W) bool, True = padding",
            "outputs": "scores (B,Q); labels (B,Q) category ids; boxes (B,Q,4) xyxy normalised to the unpadded image",
        },
        indent=2,
    )


def _trace(wrapper: ExportWrapper, inputs) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape arithmetic
        return torch.jit.trace(wrapper, inputs, check_trace=False)


def export_model(ckpt_path: str | Path, fmt: str, out_path: str | Path, force: bool = False) -> dict[str, Any]:
    """Export the checkpoint at ``ckpt_path`` (file or run folder) to ``out_path``.

    Args:
        fmt: ``export`` (``torch.export``, a .pt2 file), ``torchscript`` (``torch.jit.trace``) or ``onnx``.

    Returns:
        ``{"format", "out", "labels" (ONNX sidecar or None), "classes", "queries", "kind"}``.

    Raises:
        KacliError: unknown format, unreadable checkpoint, or ONNX export failing (e.g. a missing
        ``onnx`` package on torch versions that need it). Nothing is written then.
    """

    if fmt not in FORMATS:
        raise KacliError(f"unknown export format {fmt!r} (use {', '.join(FORMATS)})")
    out = check_output_file(out_path, force)
    labels_path = out.with_name(out.name + ".labels.json") if fmt == "onnx" else None
    if labels_path is not None:
        check_output_file(labels_path, force)
    ckpt = load_checkpoint(ckpt_path)
    wrapper = build_wrapper(ckpt)
    inputs = example_inputs()
    if fmt == "export":
        program = export_program(wrapper, inputs)
        with atomic_path(out, force=force) as tmp:
            torch.export.save(program, str(tmp), extra_files={"label_map.json": label_map_json(ckpt)})
    elif fmt == "torchscript":
        traced = _trace(wrapper, inputs)
        with atomic_path(out, force=force) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            torch.jit.save(traced, str(tmp), _extra_files={"label_map.json": label_map_json(ckpt)})
    else:
        with atomic_path(out, force=force) as tmp, atomic_path(labels_path, force=force) as tmp_labels:
            _export_onnx(wrapper, inputs, tmp)
            tmp_labels.write_text(label_map_json(ckpt) + "\n", encoding="utf-8")
    return {
        "format": fmt,
        "out": str(out),
        "labels": None if labels_path is None else str(labels_path),
        "classes": len(ckpt["label_map"]["ids"]),
        "queries": int(ckpt["arch"].get("num_queries", 0)),
        "kind": ckpt["kind"],
    }


def export_program(wrapper: ExportWrapper, inputs) -> torch.export.ExportedProgram:
    """``torch.export`` of the wrapper with dynamic batch, height and width (module docstring)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    height = Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    with torch.no_grad():
        return torch.export.export(
            wrapper, inputs,
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}},
        )  # fmt: skip


def _export_onnx(wrapper: ExportWrapper, inputs, path: Path) -> None:
    dynamic = {
        "images": {0: "batch", 2: "height", 3: "width"},
        "mask": {0: "batch", 1: "height", 2: "width"},
        "scores": {0: "batch"},
        "labels": {0: "batch"},
        "boxes": {0: "batch"},
    }
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                inputs,
                str(path),
                input_names=["images", "mask"],
                output_names=["scores", "labels", "boxes"],
                dynamic_axes=dynamic,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as e:
        cause = e if isinstance(e, ImportError) else e.__cause__
        if isinstance(cause, ImportError):
            raise KacliError(f"ONNX export needs the onnx package ({cause}); pip install 'kacli[onnx]'") from None
        raise
