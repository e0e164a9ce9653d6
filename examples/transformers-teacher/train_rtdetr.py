"""Fine-tune a small RT-DETR on one kacli task with transformers' own loss, and save it as a
transformers folder that kacli takes as a teacher (``cache-teachers --teacher DIR``).

This stands for a detector trained with another tool: nothing of it is kacli's but the data it
reads (a task of a ``tasks.yaml``) and the validation AP it is selected on (``kacli eval`` of the
folder). No pretrained weights: the model is built from a config (a ResNet-18-like backbone, the
hybrid encoder, a 3-layer decoder) and trained from scratch, images resized to SIZE × SIZE, with
a horizontal flip. Every epoch the folder is written to ``OUT/last`` and scored on the val split;
the best epoch is kept in ``OUT/best`` (with ``metrics.jsonl`` beside them).

    python examples/transformers-teacher/train_rtdetr.py --tasks tasks/tasks.yaml --task convex \
        --out runs/rtdetr-convex --epochs 40

Needs ``pip install 'kacli[hf]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kacli.data.images import load_image
from kacli.data.manifest import TaskManifest
from kacli.eval.evaluate import evaluate_checkpoints
from kacli.fsutil import load_json


def rtdetr_config(names: list[str], width: int | None, decoder_layers: int, queries: int, tiny: bool, stride: int = 32):
    """A small RT-DETR (transformers' RTDetrConfig) for these classes, built from scratch; its three
    levels end at ``stride`` (the AIFI level F5: 32, or 16 to match kacli's tiny backbone)."""
    import transformers

    hidden = [8, 8, 16, 16] if tiny else [64, 128, 256, 512]
    stages = [2, 3, 4] if stride == 32 else [1, 2, 3]
    backbone = transformers.RTDetrResNetConfig(num_channels=3, embedding_size=hidden[0], hidden_sizes=hidden,
                                               depths=[1, 1, 1, 1] if tiny else [2, 2, 2, 2], layer_type="basic",
                                               out_indices=stages)
    width = width or (16 if tiny else 128)
    return transformers.RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[hidden[i - 1] for i in stages],
        feat_strides=[stride // 4, stride // 2, stride], encoder_hidden_dim=width,
        encoder_layers=1, encoder_ffn_dim=4 * width, encoder_attention_heads=4 if width % 4 == 0 else 2,
        hidden_expansion=0.5 if tiny else 1.0, d_model=width, decoder_in_channels=[width] * 3,
        decoder_ffn_dim=4 * width, decoder_attention_heads=4 if width % 4 == 0 else 2,
        decoder_layers=1 if tiny else decoder_layers, decoder_n_points=4, num_queries=queries,
        num_denoising=0 if tiny else 50, disable_custom_kernels=True,
        id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})


class TaskImages(torch.utils.data.Dataset):
    """A task's COCO json: images resized to ``size`` × ``size`` in [0, 1], targets as
    transformers' detection losses take them ({class_labels, boxes: normalised cxcywh})."""

    def __init__(self, json_path: Path, image_root: Path, category_ids: list[int], size: int, train: bool):
        coco = load_json(json_path)
        self.root, self.size, self.train = Path(image_root), size, train
        self.images = coco["images"]
        index = {cid: k for k, cid in enumerate(category_ids)}
        self.targets: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            if a["category_id"] in index and not a.get("iscrowd", 0) and a["image_id"] in self.targets:
                self.targets[a["image_id"]].append((index[a["category_id"]], a["bbox"]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        info = self.images[i]
        image = load_image(self.root / info["file_name"]).float() / 255
        h, w = image.shape[1:]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        labels, boxes = [], []
        for c, (x, y, bw, bh) in self.targets[info["id"]]:
            if bw > 0 and bh > 0:
                labels.append(c)
                boxes.append([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes_t[:, 0] = 1 - boxes_t[:, 0]
        return image, {"class_labels": torch.tensor(labels, dtype=torch.long), "boxes": boxes_t}


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def save_folder(model, size: int, folder: Path) -> None:
    """The model and its image processor (resize to size × size, rescale, no normalisation: how it
    was trained), written to a temporary folder and renamed."""
    import transformers

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    transformers.RTDetrImageProcessor(size={"height": size, "width": size}, do_normalize=False).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=Path, required=True, help="tasks.yaml (split-tasks or merge-tasks)")
    ap.add_argument("--task", required=True, help="the task whose categories the model learns")
    ap.add_argument("--out", type=Path, required=True, help="folder for best/, last/ and metrics.jsonl")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--size", type=int, default=128, help="image side the model sees (default 128)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-drop", type=int, default=None, help="epoch after which lr ×0.1 (default: 90%% of --epochs)")
    ap.add_argument("--width", type=int, default=None, help="d_model of the encoder and decoder (default 128; 16 with --tiny)")
    ap.add_argument("--stride", type=int, choices=(16, 32), default=32,
                    help="stride of the coarsest level (the AIFI level); its projection and AIFI output guide the "
                         "student (SA) when this and --width are the kacli teachers' (the demo's: 16 and 64)")
    ap.add_argument("--decoder-layers", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a minute-sized model (the tests' smoke run)")
    args = ap.parse_args(argv)

    manifest = TaskManifest(args.tasks)
    task = manifest.task(args.task)
    torch.manual_seed(args.seed)
    from transformers import RTDetrForObjectDetection
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()

    model = RTDetrForObjectDetection(rtdetr_config(list(task.category_names), args.width, args.decoder_layers,
                                                   args.queries, args.tiny, args.stride))
    data = TaskImages(manifest.split_json("train", args.task), manifest.image_root("train"), list(task.category_ids),
                      args.size, train=True)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    drop = args.lr_drop if args.lr_drop is not None else max(1, math.ceil(0.9 * args.epochs))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=drop, gamma=0.1)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "metrics.jsonl"
    log.write_text("")
    best = -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, total, steps = time.perf_counter(), 0.0, 0
        for images, targets in loader:
            loss = model(pixel_values=images, labels=targets).loss  # transformers' own RT-DETR loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            total, steps = total + loss.detach().item(), steps + 1
        sched.step()
        model.eval()
        save_folder(model, args.size, args.out / "last")
        ap_val = evaluate_checkpoints([args.out / "last"], args.tasks, split="val")["per_task"][args.task]["AP"]
        row = {"epoch": epoch, "loss": total / max(steps, 1), "val_AP": ap_val, "seconds": time.perf_counter() - t0}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {epoch}/{args.epochs}: loss {row['loss']:.3f}, val AP {100 * ap_val:.1f} ({row['seconds']:.0f} s)",
              flush=True)
        if ap_val > best:
            best = ap_val
            shutil.rmtree(args.out / "best", ignore_errors=True)
            shutil.copytree(args.out / "last", args.out / "best")
    print(f"best val AP {100 * best:.1f}: {args.out / 'best'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
