"""Teacher-cache benchmark: what caching costs, whether reading keeps up, and how big caches get.

On demo-sized data (128-px images of the synthetic shapes, two tasks) with two ``tiny`` teachers:

1. ``cache-teachers`` wall time against the teachers' pure inference over the same entries (same
   DataLoader, workers and batches; nothing stored). Target: ≤ 1.2×.
2. The rate at which a ``TeacherCache`` DataLoader delivers entries (``collate_cached``) against the
   rate a student training step consumes them (approximated by a tiny DETR forward + backward +
   AdamW step at the same batch size). Target: ≥ 5×.
3. Bytes per entry: the tiny file as measured, and detr-r50 from the size formula for an
   800×1066 view (25×34 tokens, d 256, proj + 6 encoder layers, 2 teachers, fp16), with the
   totals it implies for VOC07+12 trainval (16,551 images) and COCO train2017 (118,287 images).
4. The int8 storage scheme on the same entries: its file against the fp16 file (target ≤ 0.55×),
   and its read from the file, int8 dequantised per batch as training does, against the student's
   consumption (target ≥ 5×).
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kacli.cache import schema
from kacli.cache.plan import plan_entries
from kacli.cache.reader import TeacherCache, collate_cached
from kacli.cache.schema import human_bytes
from kacli.cache.writer import cache_teachers, resolve_aug
from kacli.config import config_to_dict
from kacli.data.dataset import CocoDetection, collate
from kacli.data.demo_data import make_demo_data
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks
from kacli.data.transforms import AUG_PRESETS
from kacli.grid import token_grid
from kacli.models.checkpoint import save_checkpoint
from kacli.models.config import model_config
from kacli.models.detr import DETR
from kacli.teachers.load import load_teachers
from kacli.teachers.quant import dequantize

IMAGES, VIEWS, BATCH, WORKERS = 128, 2, 16, 1
REPEATS = 3  # timings alternate pure / cache and keep each one's fastest run


def _setup(root: Path) -> tuple[Path, list[Path]]:
    make_demo_data(root / "data", train_images=IMAGES, val_images=0, seed=0, size=128, progress=False)
    split_tasks(str(root / "data" / "train.json"), None, str(root / "data" / "tasks-2.yaml"), root / "tasks",
                images=root / "data" / "images")  # fmt: skip
    manifest = TaskManifest(root / "tasks")
    cfg = model_config("tiny")
    teachers = []
    for k, task in enumerate(manifest.tasks):
        torch.manual_seed(k)
        model = DETR(cfg, len(task.category_ids))
        path = root / f"teacher-{task.name}.pt"
        save_checkpoint(path, {
            "kind": "detr", "arch": cfg.to_dict(), "label_map": task.label_map(), "task": task.name,
            "model": model.state_dict(), "config": {"aug": config_to_dict(AUG_PRESETS["demo"]), "model": cfg.to_dict()},
        })  # fmt: skip
        teachers.append(path)
    return manifest.path, teachers


def _pure_inference(tasks: Path, teachers: list[Path], device: torch.device) -> tuple[float, int]:
    """Load the teachers and run them over the same entries, batches and loader as cache-teachers
    (AMP on CUDA, as there); nothing is kept. Returns (seconds, entries)."""

    t0 = time.perf_counter()
    manifest = TaskManifest(tasks)
    loaded = load_teachers(manifest, teachers)
    aug = resolve_aug(loaded, None, lambda m: None)
    ids = [c for t in manifest.tasks for c in t.category_ids]
    base = CocoDetection(manifest.split_json("train"), manifest.image_root("train"), ids, train=False, aug=aug)
    plan = plan_entries(base, aug, VIEWS, 0, loaded[0].stride)
    ds = CocoDetection(base.json_path, base.image_root, ids, train=False, aug=aug, views=plan.view_list())
    batches = [list(range(b, min(b + BATCH, plan.entries))) for b in range(0, plan.entries, BATCH)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=WORKERS, prefetch_factor=4,
                        collate_fn=functools.partial(collate, size_divisibility=loaded[0].stride),
                        pin_memory=device.type == "cuda")  # fmt: skip
    for t in loaded:
        t.model.to(device)
    with torch.inference_mode():
        for images, mask, _ in loader:
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            for t in loaded:
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    out = t.model(images, mask)
                _ = out["pred_logits"].float().cpu()
    return time.perf_counter() - t0, plan.entries


def _read_rate(cache: Path, passes: int = 2, workers: int = 2, in_memory: bool | None = None) -> float:
    """Entries per second a ``TeacherCache`` DataLoader delivers (images, targets, teacher outputs)."""

    ds = TeacherCache(cache, in_memory=in_memory)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate_cached,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    n = 0
    for _ in loader:  # warm-up pass (worker start, page cache)
        pass
    t0 = time.perf_counter()
    for _ in range(passes):
        for images, _mask, _targets, teacher in loader:
            n += len(images)
    return n / (time.perf_counter() - t0)


def _teacher_read_rate(cache: Path, in_memory: bool, passes: int = 3) -> float:
    """Entries per second of the cache's own part: the teacher outputs of shuffled entries
    (``teacher_entry``), batched as ``collate_cached`` batches them; no image is decoded. An int8
    cache is read as training reads it: int8 and scales per entry, dequantised per batch."""

    ds = TeacherCache(cache, in_memory=in_memory, dequantize=False)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(order), BATCH):
            entries = [ds.teacher_entry(e) for e in order[i:i + BATCH]]
            seqs = torch.cat([t["seqs"] for t in entries], dim=2)
            if ds.scaled:
                dequantize(seqs, torch.cat([t["seq_scale"] for t in entries], dim=2))
            [torch.stack([t["logits"][k] for t in entries]) for k in range(ds.num_teachers)]
    return passes * len(order) / (time.perf_counter() - t0)


def _student_rate(steps: int = 12) -> float:
    """Entries a tiny-DETR training step consumes per second (forward + backward + AdamW)."""

    torch.manual_seed(0)
    model = DETR(model_config("tiny"), 8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(BATCH, 3, 128, 128)
    mask = torch.zeros(BATCH, 128, 128, dtype=torch.bool)

    def step():
        out = model(images, mask)
        loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].mean()
        loss = loss + sum(a["pred_logits"].logsumexp(-1).mean() for a in out["aux_outputs"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t0)


def _fmt_bytes(n: float) -> str:
    return human_bytes(n)


def run(out_lines: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="kacli-cache-bench-") as tmp:
        root = Path(tmp)
        tasks, teachers = _setup(root)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        out = root / "cache.h5"
        kw = dict(views=VIEWS, batch_size=BATCH, workers=WORKERS, device=device.type, force=True,
                  log=lambda m: None, progress=False)  # fmt: skip
        _pure_inference(tasks, teachers, device)  # warm-up: imports, page cache, kernels
        pure, cached = [], []
        for _ in range(REPEATS):
            s, entries = _pure_inference(tasks, teachers, device)
            pure.append(s)
            t0 = time.perf_counter()
            summary = cache_teachers(tasks, teachers, out, **kw)
            cached.append(time.perf_counter() - t0)
        pure_s, cache_s = min(pure), min(cached)
        read = {w: _read_rate(out, workers=w) for w in (0, 2)}
        own = {m: _teacher_read_rate(out, in_memory=m) for m in (True, False)}
        out8 = root / "cache-int8.h5"
        t0 = time.perf_counter()
        cache_teachers(tasks, teachers, out8, dtype="int8", **kw)
        int8_s = time.perf_counter() - t0
        own8 = {m: _teacher_read_rate(out8, in_memory=m) for m in (True, False)}
        consume = _student_rate()
        tiny_bpe = out.stat().st_size / entries
        tiny_bpe8 = out8.stat().st_size / entries
        tiny_tokens = summary["tokens"] / entries

    # detr-r50 from the formula: an 800x1066 view → 25x34 tokens at stride 32
    h, w = token_grid(800, 1066, 32)
    r50 = {}
    for name, classes in (("VOC (voc-2: 10 + 10 classes)", (10, 10)), ("COCO (coco-2: 40 + 40 classes)", (40, 40))):
        r50[name] = schema.estimate_bytes(h * w, 1, 256, 7, [(100, c) for c in classes], "float16")
    r50_two = schema.estimate_bytes(h * w, 1, 256, 2, [(100, 40), (100, 40)], "float16")
    r50_8 = {name: schema.estimate_bytes(h * w, 1, 256, 7, [(100, c) for c in classes], "int8")
             for name, classes in (("voc", (10, 10)), ("coco", (40, 40)))}
    r50_two8 = schema.estimate_bytes(h * w, 1, 256, 2, [(100, 40), (100, 40)], "int8")
    size_ratio = tiny_bpe8 / tiny_bpe

    ratio = cache_s / pure_s
    lines = [
        "## Teacher cache (`kacli cache-teachers`, `TeacherCache`)",
        "",
        f"Demo data: {IMAGES} images of 128 px × {VIEWS} views = {entries} entries; 2 `tiny` teachers "
        f"(d 64, proj + 3 encoder layers, fp16, {tiny_tokens:.0f} tokens per entry); batch {BATCH}, "
        f"{WORKERS} decoding worker(s), device {device.type}; fastest of {REPEATS} alternating runs each.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| teachers' pure inference over the entries | {pure_s:.2f} s ({entries / pure_s:.0f} entries/s) | |",
        f"| `cache-teachers` (inference + extraction + HDF5 writes) | {cache_s:.2f} s ({entries / cache_s:.0f} entries/s) | |",
        f"| **cache / pure inference** | **{ratio:.2f}×** | ≤ 1.2× {'✓' if ratio <= 1.2 else '✗'} |",
        f"| student training step (tiny DETR fwd + bwd + AdamW, batch {BATCH}) | {consume:.0f} entries/s | |",
        f"| the cache's own read: teacher outputs of shuffled entries, batched (in memory / from the file) | "
        f"{own[True]:.0f} / {own[False]:.0f} entries/s | |",
        f"| **cache read / student consumption** (from the file) | **{own[False] / consume:.1f}×** | "
        f"≥ 5× {'✓' if own[False] / consume >= 5 else '✗'} |",
        f"| `TeacherCache` DataLoader with the images (`collate_cached`; in the main process / 2 workers) | "
        f"{read[0]:.0f} / {read[2]:.0f} entries/s | |",
        f"| the same ÷ student consumption | {read[0] / consume:.1f}× / {read[2] / consume:.1f}× | "
        "(bound by PNG decoding, which training on images pays anyway) |",
        f"| `cache-teachers --dtype int8` (one run, after the fp16 ones) | {int8_s:.2f} s ({entries / int8_s:.0f} entries/s) | |",
        f"| int8 file ÷ fp16 file ({_fmt_bytes(tiny_bpe8)} / {_fmt_bytes(tiny_bpe)} per entry) | **{size_ratio:.3f}×** | "
        f"≤ 0.55× {'✓' if size_ratio <= 0.55 else '✗'} |",
        f"| int8 cache's own read, dequantised per batch (in memory / from the file) | "
        f"{own8[True]:.0f} / {own8[False]:.0f} entries/s | |",
        f"| **int8 cache read / student consumption** (from the file, dequantised) | **{own8[False] / consume:.1f}×** | "
        f"≥ 5× {'✓' if own8[False] / consume >= 5 else '✗'} |",
        "",
        "Bytes per entry (file size / entries for tiny; the size formula of docs/CACHE.md for detr-r50, "
        "one 800×1066 view = 25×34 tokens, d 256, proj + 6 encoder layers, 2 teachers, fp16):",
        "",
        "| preset | per entry | VOC07+12 trainval, 16,551 images | COCO train2017, 118,287 images |",
        "|---|---|---|---|",
        f"| tiny, 128-px views (measured) | {_fmt_bytes(tiny_bpe)} | {_fmt_bytes(tiny_bpe * 16551)} | "
        f"{_fmt_bytes(tiny_bpe * 118287)} |",
    ]
    voc, coco = r50["VOC (voc-2: 10 + 10 classes)"], r50["COCO (coco-2: 40 + 40 classes)"]
    lines += [
        f"| detr-r50, all 7 layers (voc-2 / coco-2 heads) | {_fmt_bytes(voc)} / {_fmt_bytes(coco)} | "
        f"{_fmt_bytes(voc * 16551)} | {_fmt_bytes(coco * 118287)} |",
        f"| detr-r50, `--layers proj,6` | {_fmt_bytes(r50_two)} | {_fmt_bytes(r50_two * 16551)} | "
        f"{_fmt_bytes(r50_two * 118287)} |",
        f"| tiny, 128-px views, `--dtype int8` (measured) | {_fmt_bytes(tiny_bpe8)} | {_fmt_bytes(tiny_bpe8 * 16551)} | "
        f"{_fmt_bytes(tiny_bpe8 * 118287)} |",
        f"| detr-r50, all 7 layers, `--dtype int8` (voc-2 / coco-2 heads) | {_fmt_bytes(r50_8['voc'])} / "
        f"{_fmt_bytes(r50_8['coco'])} ({r50_8['coco'] / coco:.2f}× fp16) | {_fmt_bytes(r50_8['voc'] * 16551)} | "
        f"{_fmt_bytes(r50_8['coco'] * 118287)} |",
        f"| detr-r50, `--layers proj,6 --dtype int8` | {_fmt_bytes(r50_two8)} | {_fmt_bytes(r50_two8 * 16551)} | "
        f"{_fmt_bytes(r50_two8 * 118287)} |",
        "",
        "Each further view (`--views K`) multiplies these totals by K (training views are smaller on average "
        "than the 800×1066 evaluation view).",
        "",
    ]
    out_lines.extend(lines)


if __name__ == "__main__":  # pragma: no cover
    buf: list[str] = []
    run(buf)
    print("\n".join(buf))
