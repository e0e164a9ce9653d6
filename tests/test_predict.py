"""kacli predict: JSON boxes in the original image's pixels, one PNG per image, threshold respected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from conftest import assert_one_line_error
from kacli.data.images import load_image
from kacli.data.transforms import apply_view, eval_view
from kacli.models import DETR, ModelConfig
from kacli.models.checkpoint import save_checkpoint
from kacli.predict import predict_images

IDS, NAMES = [4, 9], ["disc", "bar"]
CFG = ModelConfig(backbone="tiny", d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                  num_queries=8, dropout=0.0, pre_norm=True, tiny_widths=(8, 16, 16, 32))  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = DETR(CFG, len(IDS)).eval()
    with torch.no_grad():  # queries that disagree: varied scores and labels, large boxes past the border
        model.query_embed.weight.mul_(3)
        for layer in model.transformer.decoder.layers:
            layer.multihead_attn.in_proj_weight.mul_(4)
        seen = {}
        hook = model.class_embed.register_forward_hook(lambda m, i, o: seen.setdefault("hs", i[0][-1, 0]))
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
        hook.remove()
        hs = seen["hs"]  # (Q, d) last decoder layer
        v = hs[0] - hs.mean(0)
        proj = (hs - hs.mean(0)) @ v
        v = v * 3 / proj.std()
        model.class_embed.weight.zero_()
        model.class_embed.weight[0], model.class_embed.weight[1] = v, -v
        model.class_embed.bias.copy_(torch.stack([-(hs.mean(0) @ v), hs.mean(0) @ v, torch.tensor(0.0)]))
        model.bbox_embed.layers[2].weight.mul_(20)
        model.bbox_embed.layers[2].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    save_checkpoint(d / "m.pt", {"kind": "detr", "arch": CFG.to_dict(), "model": model.state_dict(),
                                 "label_map": {"ids": IDS, "names": NAMES}, "task": "t1",
                                 "config": {"aug": {"eval_size": 64, "max_size": 96}}})  # fmt: skip
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(48, 64), (90, 40)]):
        sub = d / f"dir{i}"
        sub.mkdir()
        p = sub / "img.png"  # the same file name twice: two PNGs all the same
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(p)
    return d, model, images


@torch.no_grad()
def reference(model, path, size, max_size):
    """Boxes and scores computed by hand: eval view → model → softmax / cxcywh × (W, H) → clip."""
    img = load_image(path)
    H, W = img.shape[1:]
    x, _, _ = apply_view(img, torch.zeros(0, 4), eval_view(H, W, size, max_size))
    out = model(x[None], torch.zeros(1, *x.shape[1:], dtype=torch.bool))
    scores, labels = out["pred_logits"][0].softmax(-1)[:, :-1].max(-1)
    boxes = box_convert(out["pred_boxes"][0], "cxcywh", "xyxy") * torch.tensor([W, H, W, H])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    return scores, labels, boxes, (H, W)


def test_predict_writes_json_and_pngs_in_pixels(setup, tmp_path):
    d, model, images = setup
    res = predict_images(d / "m.pt", images, None, None, 0.0, tmp_path / "out", device="cpu")
    assert (res["size"], res["max_size"]) == (64, 96)  # the checkpoint's eval sizes
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert list(data) == [str(p) for p in images]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img.png", "img_2.png", "predictions.json"]
    for p, png in zip(images, ["img.png", "img_2.png"]):
        rows = data[str(p)]
        scores, labels, boxes, (H, W) = reference(model, p, 64, 96)
        assert len(rows) == CFG.num_queries  # threshold 0 keeps every query
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
        order = scores.argsort(descending=True)
        got = torch.tensor([r["box"] for r in rows])
        torch.testing.assert_close(got, boxes[order], atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), scores[order], atol=1e-5, rtol=0)
        assert [r["category_id"] for r in rows] == [IDS[i] for i in labels[order].tolist()]
        assert [r["name"] for r in rows] == [NAMES[i] for i in labels[order].tolist()]
        assert (got[:, 0] >= 0).all() and (got[:, 2] <= W).all() and (got[:, 1] >= 0).all() and (got[:, 3] <= H).all()
        assert (got[:, 2] >= got[:, 0]).all() and (got[:, 3] >= got[:, 1]).all()
        drawn = Image.open(tmp_path / "out" / png)
        assert drawn.size == (W, H)
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(p).convert("RGB")))


def test_threshold_keeps_exactly_the_scores_above_it(setup, tmp_path, cli):
    d, model, images = setup
    all_rows = predict_images(d / "m.pt", images[:1], 64, 96, 0.0, tmp_path / "all", device="cpu")["predictions"]
    scores = sorted(r["score"] for r in all_rows[str(images[0])])
    t = (scores[3] + scores[4]) / 2  # between the 4th and 5th best: 4 kept of 8
    res = cli("predict", "--model", d / "m.pt", images[0], "--size", "64", "--max-size", "96",
              "--threshold", str(t), "--device", "cpu", "--out", tmp_path / "t")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "predictions" in res.stdout and ("disc" in res.stdout or "bar" in res.stdout)
    kept = json.loads((tmp_path / "t" / "predictions.json").read_text())[str(images[0])]
    assert [r["score"] for r in kept] == sorted((s for s in scores if s >= t), reverse=True)
    assert len(kept) == 4


def test_predict_bad_input(setup, tmp_path, cli):
    d, _, images = setup
    out = tmp_path / "out"
    assert_one_line_error(cli("predict", "--model", d / "m.pt", images[0], tmp_path / "nope.jpg", "--out", out),
                          "nope.jpg", "not found")  # fmt: skip
    (tmp_path / "notes.png").write_text("not an image")
    assert_one_line_error(cli("predict", "--model", d / "m.pt", tmp_path / "notes.png", "--out", out),
                          "notes.png", "not a readable image")  # fmt: skip
    assert_one_line_error(cli("predict", "--model", tmp_path / "none.pt", images[0], "--out", out), "not found")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_one_line_error(cli("predict", "--model", d / "m.pt", images[0], "--out", out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
