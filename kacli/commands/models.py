"""``kacli import-checkpoint``, ``kacli predict`` and ``kacli export``: using and moving models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    app.command(
        "import-checkpoint",
        epilog=(
            "Examples: kacli import-checkpoint detr-r50-e632da11.pth --out detr-r50.pt --label-map coco; "
            "kacli import-checkpoint hf/detr-resnet-50/ --out detr-r50.pt"
        ),
    )(import_checkpoint)
    app.command(
        "predict",
        epilog="Example: kacli predict --model runs/student/best.pt img1.jpg img2.jpg --threshold 0.5 --out preds",
    )(predict)
    app.command(
        "export",
        epilog="Example: kacli export --model runs/student/best.pt --format export --out student.pt2",
    )(export)


@cli_errors
def import_checkpoint(
    src: Path = typer.Argument(
        ..., metavar="SRC", show_default=False,
        help="facebookresearch/detr, UP-DETR or Atten4Vis/ConditionalDETR .pth, HF pytorch_model.bin / "
        "model.safetensors, or an HF model folder (DETR or Conditional DETR).",
    ),
    out: Path = typer.Option(..., "--out", metavar="DST.pt", show_default=False, help="kacli checkpoint to write."),
    label_map: Optional[str] = typer.Option(
        None, "--label-map", metavar="coco|FILE", show_default=False,
        help="Category names by class index (= category id): 'coco', or YAML/JSON [{id, name}] or {id: name}. "
        "Default: HF config.json's id2label, else coco for 91-class heads.",
    ),
    heads: Optional[int] = typer.Option(
        None, "--heads", min=1, show_default=False,
        help="Attention heads (not visible in the weights; default: the checkpoint's args/config.json, else 8).",
    ),
    dilation: Optional[bool] = typer.Option(
        None, "--dilation/--no-dilation", show_default=False,
        help="DC5 backbone (default: the checkpoint's args/config.json, else no).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
):  # fmt: skip
    """Convert a DETR or Conditional DETR checkpoint (facebookresearch/detr, UP-DETR,
    Atten4Vis/ConditionalDETR, HF transformers) into a kacli checkpoint.

    The architecture is read from the tensors (DETR or Conditional DETR, ResNet depth, d_model,
    layers, FFN, queries, pre-norm); pretraining-only keys are ignored and listed."""
    from kacli.models.import_detr import import_checkpoint as run

    report = run(src, out, label_map, heads=heads, dilation=dilation, force=force)
    if as_json:
        console.print_json(json.dumps(report))
        return
    a = report["arch"]
    table = Table(title=f"imported {report['layout']} checkpoint")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", "Conditional DETR (sigmoid classes)" if a.get("arch") == "conditional" else "DETR")
    table.add_row("backbone", a["backbone"] + (" (DC5)" if a["dilation"] else ""))
    table.add_row("transformer", f"d {a['d_model']}, {a['nheads']} heads, {a['enc_layers']}+{a['dec_layers']} layers, "
                  f"FFN {a['dim_feedforward']}, {'pre' if a['pre_norm'] else 'post'}-norm")  # fmt: skip
    table.add_row("queries", str(a["num_queries"]))
    lm = report["label_map"]
    where = "rows removed" if a.get("arch") == "conditional" else "in the softmax"
    table.add_row("classes", f"{len(lm['ids'])} from {lm['source']} ({len(report['dropped_slots'])} unnamed slots: {where}, never predicted)")
    table.add_row("tensors", f"{len(report['loaded'])} loaded, {len(report['ignored'])} ignored")
    console.print(table)
    if report["ignored"]:
        shown = ", ".join(report["ignored"][:8]) + (" …" if len(report["ignored"]) > 8 else "")
        console.print(f"ignored: {shown}", highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {report['out']}", highlight=False)


@cli_errors
def predict(
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", show_default=False, help="Image files."),
    model: Path = typer.Option(
        ..., "--model", metavar="CKPT", show_default=False, help="kacli checkpoint (teacher, raw or student) or run folder."
    ),
    out: Path = typer.Option(..., "--out", metavar="DIR", show_default=False, help="Output folder."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1, show_default=False, help="Shorter side (default: the model's eval size, else 800)."
    ),
    max_size: Optional[int] = typer.Option(
        None, "--max-size", min=1, show_default=False, help="Cap on the longer side (default: the model's, else 1333)."
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", min=0.0, max=1.0, show_default=False,
        help="Keep detections scoring at least this (default 0.5; 0 with --format coco, as AP needs every detection).",
    ),
    fmt: str = typer.Option(
        "kacli", "--format", metavar="kacli|coco",
        help="predictions.json layout: kacli ({image: [{box xyxy, score, category_id, name}]}) or coco "
        "(a COCO results list [{image_id, category_id, bbox xywh, score}]).",
    ),
    image_ids: Optional[Path] = typer.Option(
        None, "--image-ids", metavar="COCO.json", show_default=False,
        help="With --format coco: take image ids from this COCO json (matched by file name); "
        "default: the number the file name is (000000397133.jpg → 397133).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON instead of a table."),
):  # fmt: skip
    """Detect objects in images: DIR/predictions.json (pixel xyxy boxes, score, category id and name;
    or, with --format coco, a COCO results list) and one PNG per image with the boxes drawn and labelled."""
    from kacli.predict import predict_images

    if threshold is None:
        threshold = 0.0 if fmt == "coco" else 0.5
    res = predict_images(model, images, size, max_size, threshold, out, device=device, force=force,
                         fmt=fmt, image_ids=image_ids)
    if as_json:
        console.print_json(json.dumps(res["results"] if fmt == "coco" else res["predictions"]))
        return
    table = Table(title=f"predictions (score ≥ {threshold:g}, size {res['size']}/{res['max_size']})")
    table.add_column("image", style="bold")
    table.add_column("detections", justify="right")
    table.add_column("best")
    for path, rows in res["predictions"].items():
        best = ", ".join(f"{r['name']} {r['score']:.2f}" for r in rows[:3]) + (" …" if len(rows) > 3 else "")
        table.add_row(path, str(len(rows)), best)
    console.print(table)
    console.print(f"wrote {Path(res['out']) / 'predictions.json'} and {len(res['pngs'])} PNGs", highlight=False)


@cli_errors
def export(
    model: Path = typer.Option(..., "--model", metavar="CKPT", show_default=False, help="kacli checkpoint or run folder."),
    fmt: str = typer.Option(
        ..., "--format", metavar="export|torchscript|onnx", show_default=False,
        help="export: a torch.export program (.pt2; load with torch.export.load(FILE).module()); "
        "torchscript (deprecated in PyTorch, kept while it ships); onnx.",
    ),
    out: Path = typer.Option(..., "--out", metavar="FILE", show_default=False, help="File to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file (and its .labels.json)."),
):  # fmt: skip
    """Export a model as a torch.export program, TorchScript or ONNX: (images (B,3,H,W) normalised,
    mask (B,H,W) bool) → (scores (B,Q), labels (B,Q) category ids, boxes (B,Q,4) xyxy normalised to
    each unpadded image); batch, height and width are dynamic.

    The label map goes inside the .pt2 and TorchScript files (label_map.json) or beside the ONNX
    file (FILE.labels.json)."""
    from kacli.export import export_model

    res = export_model(model, fmt, out, force=force)
    extra = f" and {res['labels']}" if res["labels"] else ""
    console.print(
        f"wrote {res['out']}{extra}: {res['kind']} model, {res['classes']} classes, {res['queries']} queries",
        highlight=False,
    )
