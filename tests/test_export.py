"""Exported models compute what the checkpoint's model computes, at any image size, label map included."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision.ops import box_convert

from conftest import assert_one_line_error
from kacli.models import DETR, ModelConfig
from kacli.models.checkpoint import save_checkpoint
from kacli.models.postprocess import postprocess
from kacli.models.student import Student

IDS, NAMES = [3, 7, 11], ["circle", "square", "star"]


def make_ckpt(path, cfg: ModelConfig, seed: int = 0, student: bool = False) -> DETR:
    torch.manual_seed(seed)
    model = (Student(cfg, len(IDS), num_parts=2, compress="redundancy") if student else DETR(cfg, len(IDS))).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    arch = model.arch_dict() if student else cfg.to_dict()
    save_checkpoint(path, {"kind": "student" if student else "detr", "arch": arch, "model": model.state_dict(),
                           "label_map": {"ids": IDS, "names": NAMES}})  # fmt: skip
    return model


TINY = ModelConfig(backbone="tiny", d_model=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
                   num_queries=6, dropout=0.0, pre_norm=True, tiny_widths=(8, 16, 16, 32))  # fmt: skip
R18 = ModelConfig(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                  num_queries=4, dropout=0.0, pre_norm=False)  # fmt: skip
TINY_COND = dataclasses.replace(TINY, arch="conditional")
R18_COND = dataclasses.replace(R18, arch="conditional")


def batch(h: int, w: int, seed: int, n: int = 2):
    """``n`` images; every one after the first padded bottom/right (by varying amounts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(1, n):
        mask[i, h - h // (3 + i) :, :] = True
        mask[i, :, w - w // (2 + i) :] = True
    return x, mask


@torch.no_grad()
def expected(model, x, mask):
    """What the export must return, computed from the eager model's raw outputs."""
    out = model(x, mask)
    boxes = box_convert(out["pred_boxes"], "cxcywh", "xyxy")
    if model.classifier == "sigmoid":  # the top min(100, Q·K) (query, class) pairs by σ
        prob = out["pred_logits"].sigmoid()
        K = prob.shape[-1]
        scores, flat = prob.flatten(1).topk(min(100, prob.shape[1] * K), dim=1)
        query = flat // K
        return scores, torch.tensor(IDS)[flat % K], boxes[torch.arange(len(x))[:, None], query], out
    scores, idx = out["pred_logits"].softmax(-1)[..., :-1].max(-1)
    return scores, torch.tensor(IDS)[idx], boxes, out


def detections(cfg: ModelConfig) -> int:
    """Detections per image: one per query (softmax), min(100, Q·K) (sigmoid)."""
    return cfg.num_queries if cfg.classifier == "softmax" else min(100, cfg.num_queries * len(IDS))


SIZES = [(64, 96), (160, 128)]  # neither is the trace example's (128, 160)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "cfg, sizes, student",
    [(TINY, SIZES, False), (R18, SIZES[:1], False), (TINY, SIZES[1:], True), (R18_COND, SIZES[:1], False),
     (TINY_COND, SIZES[1:], True)],
    ids=["tiny-prenorm", "resnet18-postnorm", "student-compressed", "conditional-resnet18", "conditional-student"],
)
def test_torchscript_equals_the_checkpoint_model(tmp_path, cli, cfg, sizes, student):
    model = make_ckpt(tmp_path / "m.pt", cfg, student=student)
    res = cli("export", "--model", tmp_path / "m.pt", "--format", "torchscript", "--out", tmp_path / "m.ts")
    assert res.exit_code == 0, res.stderr
    extra = {"label_map.json": ""}
    ts = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    lm = json.loads(extra["label_map.json"])
    assert lm["ids"] == IDS and lm["names"] == NAMES
    assert ts.category_ids.tolist() == IDS
    for i, (h, w) in enumerate(sizes):
        x, mask = batch(h, w, i)
        with torch.no_grad():
            scores, labels, boxes = ts(x, mask)
        e_scores, e_labels, e_boxes, raw = expected(model, x, mask)
        D = detections(cfg)
        assert scores.shape == (2, D) and boxes.shape == (2, D, 4)
        torch.testing.assert_close(scores, e_scores, atol=1e-5, rtol=0)
        assert torch.equal(labels, e_labels) and set(labels.unique().tolist()) <= set(IDS)
        torch.testing.assert_close(boxes, e_boxes, atol=1e-5, rtol=0)
        # Normalised xyxy × (w, h, w, h) are postprocess's pixel boxes for the unpadded image.
        px = postprocess(raw, torch.tensor([[h, w], [h, w]]), model.classifier)[0]["boxes"]
        torch.testing.assert_close(boxes[0] * torch.tensor([w, h, w, h]), px, atol=1e-4, rtol=0)


# Dynamic axes: two batch sizes × two image sizes, none of them the trace example's (2, 128×160).
DYNAMIC = [(n, size) for n in (1, 3) for size in SIZES]


@pytest.mark.parametrize("cfg", [TINY, TINY_COND], ids=["detr", "conditional"])
def test_onnx_has_dynamic_batch_and_size_and_equals_the_checkpoint_model(tmp_path, cli, cfg):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = make_ckpt(tmp_path / "m.pt", cfg, seed=1)
    res = cli("export", "--model", tmp_path / "m.pt", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert res.exit_code == 0, res.stderr
    lm = json.loads((tmp_path / "m.onnx.labels.json").read_text())
    assert lm["ids"] == IDS and lm["names"] == NAMES
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "mask"]
    for i, (n, (h, w)) in enumerate(DYNAMIC):
        x, mask = batch(h, w, 10 + i, n)
        scores, labels, boxes = sess.run(None, {"images": x.numpy(), "mask": mask.numpy()})
        e_scores, e_labels, e_boxes, _ = expected(model, x, mask)
        assert scores.shape == e_scores.shape == (n, detections(cfg))
        torch.testing.assert_close(torch.from_numpy(scores), e_scores, atol=1e-4, rtol=0)
        if cfg.classifier == "softmax":  # one detection per query, in query order
            assert torch.equal(torch.from_numpy(labels), e_labels)
            torch.testing.assert_close(torch.from_numpy(boxes), e_boxes, atol=1e-4, rtol=0)
        else:  # sorted by score: pairs whose scores agree to 1e-7 may come in either order
            assert_same_pairs(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(boxes),
                              e_scores, e_labels, e_boxes)


def assert_same_pairs(scores, labels, boxes, e_scores, e_labels, e_boxes, tol=1e-4):
    """Each image's detections are the expected ones: every detection matches a distinct expected one
    of the same label, score (≤ tol) and box (≤ tol), among those of nearly the same rank."""
    for b in range(len(scores)):
        free = torch.ones(len(e_scores[b]), dtype=torch.bool)
        for i in range(len(scores[b])):
            ok = (free & (e_labels[b] == labels[b, i]) & ((e_scores[b] - scores[b, i]).abs() <= tol)
                  & ((e_boxes[b] - boxes[b, i]).abs().amax(-1) <= tol))
            assert ok.any(), (b, i, float(scores[b, i]), labels[b, i].item(), boxes[b, i].tolist())
            free[int(ok.nonzero()[0])] = False


@pytest.mark.parametrize("cfg, student", [(TINY, False), (R18, False), (TINY, True), (TINY_COND, True)],
                         ids=["tiny-prenorm", "resnet18-postnorm", "student-compressed", "conditional-student"])  # fmt: skip
def test_torch_export_program_has_dynamic_batch_and_size_and_equals_the_checkpoint_model(tmp_path, cli, cfg, student):
    model = make_ckpt(tmp_path / "m.pt", cfg, seed=2, student=student)
    res = cli("export", "--model", tmp_path / "m.pt", "--format", "export", "--out", tmp_path / "m.pt2")
    assert res.exit_code == 0, res.stderr
    extra = {"label_map.json": ""}
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    lm = json.loads(extra["label_map.json"])
    assert lm["ids"] == IDS and lm["names"] == NAMES
    run = program.module()
    for i, (n, (h, w)) in enumerate(DYNAMIC):
        x, mask = batch(h, w, 20 + i, n)
        with torch.no_grad():
            scores, labels, boxes = run(x, mask)
        e_scores, e_labels, e_boxes, _ = expected(model, x, mask)
        assert scores.shape == (n, detections(cfg)) and boxes.shape == (n, detections(cfg), 4)
        torch.testing.assert_close(scores, e_scores, atol=1e-5, rtol=0)
        assert torch.equal(labels, e_labels)
        torch.testing.assert_close(boxes, e_boxes, atol=1e-5, rtol=0)


def test_export_bad_input(tmp_path, cli):
    out = tmp_path / "m.ts"
    (tmp_path / "junk.pt").write_text("junk")
    assert_one_line_error(cli("export", "--model", tmp_path / "junk.pt", "--format", "torchscript", "--out", out), "junk.pt")
    assert_one_line_error(cli("export", "--model", tmp_path / "none.pt", "--format", "onnx", "--out", out), "not found")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "foreign.pt")
    assert_one_line_error(
        cli("export", "--model", tmp_path / "foreign.pt", "--format", "torchscript", "--out", out), "import-checkpoint"
    )
    make_ckpt(tmp_path / "m.pt", TINY)
    assert_one_line_error(cli("export", "--model", tmp_path / "m.pt", "--format", "tflite", "--out", out), "tflite", "export")
    assert not out.exists() and not (tmp_path / "m.ts.labels.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "junk.pt", "m.pt"]
