"""CocoDetection over a tiny COCO json + PNGs, replayed views, and collate."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kacli.data.dataset import CocoDetection, collate
from kacli.data.images import load_image
from kacli.data.transforms import AugConfig, View, apply_view
from kacli.errors import KacliError

AUG = AugConfig(scales=(48, 56, 64), max_size=96, crop_scales=(40, 48), crop_min=24, crop_max=40, eval_size=120)


def write_png(path, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a.png", 60, 80, 0)
    write_png(root / "sub" / "b.png", 50, 40, 1)
    write_png(root / "c.png", 64, 64, 2)
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 60, "width": 80},
            {"id": 3, "file_name": "sub/b.png", "height": 50, "width": 40},
            {"id": 9, "file_name": "c.png", "height": 64, "width": 64},
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 10], "iscrowd": 0, "area": 300},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 80, 60], "iscrowd": 0, "area": 4800},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 1, "area": 100},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 5, "image_id": 3, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 6, "image_id": 9, "category_id": 2, "bbox": [8, 4, 40, 50], "iscrowd": 0, "area": 2000},
        ],
    }
    path = tmp_path / "all.json"
    path.write_text(json.dumps(data))
    return path, root, data


def test_eval_items_hand_computed(coco):
    path, root, _ = coco
    ds = CocoDetection(path, root, label_ids=[2, 1], train=False, aug=AUG)
    assert len(ds) == 3
    img, t = ds[0]
    # 60x80 with eval_size 120 (cap 96 → short side round(96*60/80) = 72, long int(72*80/60) = 96).
    assert img.shape == (3, 72, 96)
    assert t["size"].tolist() == [72, 96] and t["orig_size"].tolist() == [60, 80] and t["image_id"] == 7
    # Crowd and category 5 dropped; category 1 → index 1, category 2 → index 0 (label_ids order).
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    # [10,20,30,10] xywh → xyxy [10,20,40,30] → cxcywh [25,25,30,10] in 80x60 → normalised.
    expect = torch.tensor([[25 / 80, 25 / 60, 30 / 80, 10 / 60], [0.5, 0.5, 1.0, 1.0]])
    assert torch.allclose(t["boxes"], expect, atol=1e-6)
    assert t["view"] == [0.0, 0.0, 0.0, 60.0, 80.0, 72.0, 96.0]
    # The image is exactly apply_view on the raw decode.
    direct, _, _ = apply_view(load_image(root / "a.png"), torch.zeros(0, 4), View.from_list(t["view"]))
    assert torch.equal(img, direct)
    # Image with only an ignored category: no boxes.
    _, t1 = ds[1]
    assert t1["boxes"].shape == (0, 4) and t1["labels"].shape == (0,)


def test_raw_and_image_info(coco):
    path, root, _ = coco
    ds = CocoDetection(path, root, label_ids=[2, 1], train=False, aug=AUG)
    image, boxes, cats = ds.raw(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 60, 80)
    assert boxes.tolist() == [[10.0, 20.0, 40.0, 30.0], [0.0, 0.0, 80.0, 60.0]]
    assert cats.tolist() == [1, 2]
    assert ds.image_info(1)["file_name"] == "sub/b.png"


def test_train_views_reproducible_and_replayable(coco):
    path, root, _ = coco
    a = CocoDetection(path, root, [2, 1], train=True, aug=AUG, generator_seed=4)
    b = CocoDetection(path, root, [2, 1], train=True, aug=AUG, generator_seed=4)
    views0 = [a[i][1]["view"] for i in range(3)]
    assert views0 == [b[i][1]["view"] for i in range(3)]
    assert torch.equal(a[2][0], b[2][0])
    a.set_epoch(1)
    views1 = [a[i][1]["view"] for i in range(3)]
    assert views1 != views0
    for v in views1:
        assert 48 <= min(v[5], v[6]) <= 64 or max(v[5], v[6]) == 96
    # Replaying the stored views gives the same tensors and targets.
    items = [a[i] for i in range(3)]
    stored = [(i, View.from_list(t["view"])) for i, (_, t) in enumerate(items)]
    replay = CocoDetection(path, root, [2, 1], train=False, aug=AUG, views=stored)
    for (img, t), i in zip(items, range(3)):
        img2, t2 = replay[i]
        assert torch.equal(img, img2)
        assert torch.equal(t["boxes"], t2["boxes"]) and torch.equal(t["labels"], t2["labels"])
    # Several views of one image.
    two = [(2, View(False, None, (32, 32))), (2, View(True, None, (32, 32)))]
    multi = CocoDetection(path, root, [2, 1], train=False, aug=AUG, views=two)
    assert len(multi) == 2
    x, tx = multi[0]
    y, ty = multi[1]
    assert torch.equal(x.flip(-1), y)
    assert tx["image_id"] == ty["image_id"] == 9
    # Box [8,4,48,54] in 64x64 → flipped x: [16,4,56,54]; cx 36/64.
    assert ty["boxes"][0, 0].item() == pytest.approx(36 / 64)


def test_workers_give_the_same_items(coco):
    path, root, _ = coco
    ds = CocoDetection(path, root, [2, 1], train=True, aug=AUG, generator_seed=1)
    ds.set_epoch(3)
    direct = [ds[i] for i in range(3)]
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b[0])
    for (img, t), (img2, t2) in zip(direct, loader):
        assert torch.equal(img, img2) and t["view"] == t2["view"]


def test_path_escaping_root_and_bad_files(coco, tmp_path):
    path, root, data = coco
    data["images"][1]["file_name"] = "../outside.png"
    write_png(tmp_path / "outside.png", 50, 40, 1)
    path.write_text(json.dumps(data))
    ds = CocoDetection(path, root, [2, 1], train=False, aug=AUG)
    with pytest.raises(KacliError, match="escapes the image root") as e:
        ds[1]
    assert e.value.path == str(path)
    data["images"][1]["file_name"] = "missing.png"
    path.write_text(json.dumps(data))
    with pytest.raises(KacliError, match="image not found"):
        CocoDetection(path, root, [2, 1], train=False, aug=AUG)[1]
    data["images"][1].update(file_name="a.png")
    path.write_text(json.dumps(data))
    with pytest.raises(KacliError, match="image is 60x80 but all.json says 50x40"):
        CocoDetection(path, root, [2, 1], train=False, aug=AUG)[1]
    with pytest.raises(KacliError, match="outside the 64x64 image") as e:
        CocoDetection(path, root, [2, 1], train=False, aug=AUG, views=[(2, View(False, (0, 0, 65, 64), (8, 8)))])[0]
    assert e.value.path == str(root / "c.png")
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(KacliError, match="not a COCO annotation file"):
        CocoDetection(path, root, [2, 1], train=False)
    with pytest.raises(KacliError, match="image root not found"):
        CocoDetection(path, tmp_path / "nope", [2, 1], train=False)


def test_collate_pads_and_masks():
    a = torch.full((3, 5, 7), 1.0)
    b = torch.full((3, 6, 4), 2.0)
    images, mask, targets = collate([(a, {"n": 0}), (b, {"n": 1})])
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    assert [t["n"] for t in targets] == [0, 1]
    assert torch.equal(images[0, :, :5, :7], a) and images[0, :, 5:].abs().sum() == 0
    assert torch.equal(images[1, :, :6, :4], b) and images[1, :, :, 4:].abs().sum() == 0
    assert mask[0].sum().item() == 6 * 7 - 5 * 7 and not mask[0, :5, :7].any() and mask[0, 5].all()
    assert mask[1].sum().item() == 6 * 7 - 6 * 4 and mask[1, :, 4:].all()
    images, mask, _ = functools.partial(collate, size_divisibility=4)([(a, {}), (b, {})])
    assert images.shape == (2, 3, 8, 8) and mask[0].sum().item() == 64 - 35 and mask[1].sum().item() == 64 - 24
