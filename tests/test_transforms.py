"""Views: replayable bit for bit, boxes follow the pixels, DETR's sizes and sampling ranges."""

from __future__ import annotations

import pytest
import torch

from kacli.data.transforms import (
    AUG_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    View,
    apply_view,
    eval_view,
    resized_size,
    sample_train_view,
)
from kacli.errors import KacliError


def textured(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def unnormalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return img * std + mean


# -- replay --------------------------------------------------------------------------------------

# A small multi-scale, cropping augmentation (the demo preset uses neither, so it would not
# exercise crops).
CROPPING = AugConfig(scales=(112, 120, 128, 136, 144), max_size=192, crop_scales=(96, 112, 128),
                     crop_min=96, crop_max=128, eval_size=128)


def test_same_view_gives_identical_tensor_and_list_roundtrip():
    image = textured(97, 131)
    boxes = torch.tensor([[10.0, 5.0, 60.0, 40.0], [90.0, 70.0, 130.0, 96.0]])
    g = torch.Generator().manual_seed(3)
    views = [eval_view(97, 131, 128, 192)] + [sample_train_view(97, 131, CROPPING, g) for _ in range(12)]
    assert any(v.flip for v in views) and any(v.crop != (0, 0, 97, 131) for v in views)
    for v in views:
        a, ba, ka = apply_view(image, boxes, v)
        b, bb, kb = apply_view(image.clone(), boxes.clone(), v)
        assert torch.equal(a, b) and torch.equal(ba, bb) and torch.equal(ka, kb)
        lst = v.to_list()
        assert len(lst) == 7 and all(isinstance(x, float) for x in lst)
        # Stored as float32 (HDF5) and read back.
        back = View.from_list(torch.tensor(lst, dtype=torch.float32))
        assert back == v
        c, bc, _ = apply_view(image, boxes, back)
        assert torch.equal(a, c) and torch.equal(ba, bc)
        assert a.dtype == torch.float32 and tuple(a.shape) == (3, *v.size)


def test_replay_does_not_depend_on_thread_count():
    image = textured(150, 210, seed=1)
    view = View(flip=True, crop=(11, 23, 120, 170), size=(97, 137))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, _, _ = apply_view(image, torch.zeros(0, 4), view)
        torch.set_num_threads(2)
        b, _, _ = apply_view(image, torch.zeros(0, 4), view)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


def test_crop_none_is_the_whole_image():
    image = textured(40, 60)
    boxes = torch.tensor([[-5.0, 3.0, 70.0, 20.0]])
    v_none = View(flip=True, crop=None, size=(20, 30))
    v_full = View.from_list(v_none.to_list((40, 60)))
    assert v_full.crop == (0, 0, 40, 60)
    a, ba, _ = apply_view(image, boxes, v_none)
    b, bb, _ = apply_view(image, boxes, v_full)
    assert torch.equal(a, b) and torch.equal(ba, bb)
    # Clipped to the image, flipped, halved: x 0..60 → 0..30, y 3..20 → 1.5..10.
    assert bb.tolist() == [[0.0, 1.5, 30.0, 10.0]]
    with pytest.raises(ValueError):
        v_none.to_list()


def test_normalisation_values():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[:, :, 2:] = 255
    out, _, _ = apply_view(image, torch.zeros(0, 4), View(False, None, (4, 4)))
    for c in range(3):
        assert out[c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-6)
        assert out[c, 0, 3].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)


# -- boxes ---------------------------------------------------------------------------------------


def test_boxes_hand_computed_and_dropped():
    image = textured(50, 70)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [60.0, 40.0, 70.0, 50.0], [10.0, 10.0, 10.0, 30.0]])
    out, b, keep = apply_view(image, boxes, View(flip=True, crop=(5, 6, 30, 40), size=(60, 80)))
    # Box 0: crop → (-6,-5,14,15) → clipped (0,0,14,15) → flipped in width 40 → (26,0,40,15) → ×2.
    assert b[0].tolist() == [52.0, 0.0, 80.0, 30.0]
    # Box 1 lies outside the crop; box 2 has no width: both dropped.
    assert keep.tolist() == [True, False, False]
    assert b.shape == (3, 4) and out.shape == (3, 60, 80)


def bright_box(img: torch.Tensor) -> list[float]:
    """xyxy (pixel edges) of the pixels brighter than half."""
    on = unnormalise(img).mean(0) > 0.5
    ys = torch.nonzero(on.any(1)).flatten()
    xs = torch.nonzero(on.any(0)).flatten()
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize(
    "view",
    [
        View(False, None, (120, 160)),
        View(True, None, (120, 160)),
        View(False, None, (75, 100)),
        View(True, None, (210, 280)),
        View(False, (20, 10, 80, 100), (80, 100)),
        View(True, (45, 70, 70, 85), (140, 170)),
        View(True, (0, 50, 120, 110), (60, 55)),
        View(False, (35, 0, 60, 160), (90, 240)),
    ],
)
def test_boxes_follow_the_bright_region(view):
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    image[:, 30:70, 40:100] = 255  # xyxy 40,30,100,70
    boxes = torch.tensor([[40.0, 30.0, 100.0, 70.0]])
    out, b, keep = apply_view(image, boxes, view)
    assert keep.item()
    expect = bright_box(out)
    for got, want in zip(b[0].tolist(), expect):
        assert abs(got - want) <= 1.0, (view, b[0].tolist(), expect)


def test_boxes_follow_the_bright_region_in_sampled_views():
    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    image[:, 20:76, 30:100] = 255
    boxes = torch.tensor([[30.0, 20.0, 100.0, 76.0]])
    g = torch.Generator().manual_seed(7)
    checked = 0
    for _ in range(30):
        v = sample_train_view(96, 128, CROPPING, g)
        out, b, keep = apply_view(image, boxes, v)
        if not keep.item():
            continue
        x0, y0, x1, y1 = b[0].tolist()
        if min(x1 - x0, y1 - y0) < 4:  # slivers blur away; the hand cases cover edges
            continue
        for got, want in zip(b[0].tolist(), bright_box(out)):
            assert abs(got - want) <= 1.0, (v, b[0].tolist())
        checked += 1
    assert checked >= 20


def test_crop_outside_image_is_an_error():
    with pytest.raises(KacliError, match="outside the 40x60 image"):
        apply_view(textured(40, 60), torch.zeros(0, 4), View(False, (10, 10, 40, 20), (10, 10)))


# -- sizes ---------------------------------------------------------------------------------------


def test_eval_view_sizes_hand_cases():
    assert eval_view(480, 640, 800, 1333) == View(False, (0, 0, 480, 640), (800, 1066))
    # Cap: 2.5 × 800 > 1333 → short side round(1333 × 0.4) = 533, long int(533 × 2.5) = 1332.
    assert eval_view(400, 1000, 800, 1333).size == (533, 1332)
    assert eval_view(1000, 400, 800, 1333).size == (1332, 533)
    assert eval_view(800, 1200, 800, 1333).size == (800, 1200)  # already the right size
    # Demo size, upscaling a small image under the cap: round(192 × 50/100) = 96.
    assert resized_size(100, 50, 128, 192) == (192, 96)
    assert resized_size(427, 640, 800, None) == (800, 1199)  # int(800 × 640/427) = int(1199.06)


def test_sample_train_view_is_deterministic():
    aug = AugConfig()
    a = [sample_train_view(480, 640, aug, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    s1 = [sample_train_view(480, 640, aug, g1) for _ in range(20)]
    s2 = [sample_train_view(480, 640, aug, g2) for _ in range(20)]
    assert s1 == s2
    g3 = torch.Generator().manual_seed(12)
    assert s1 != [sample_train_view(480, 640, aug, g3) for _ in range(20)]


@pytest.mark.parametrize("hw", [(480, 640), (375, 500), (1000, 300)])
def test_sample_train_view_ranges(hw):
    H, W = hw
    aug = AugConfig()
    g = torch.Generator().manual_seed(0)
    flips = crops = 0
    n = 400
    for _ in range(n):
        v = sample_train_view(H, W, aug, g)
        top, left, ch, cw = v.crop
        assert 0 <= top and 0 <= left and top + ch <= H and left + cw <= W and ch >= 1 and cw >= 1
        oh, ow = v.size
        assert max(oh, ow) <= aug.max_size
        # Shorter side is one of the scales, or the longer side sits at the cap.
        assert min(oh, ow) in aug.scales or max(oh, ow) >= aug.max_size - 3, v
        flips += v.flip
        if (top, left, ch, cw) != (0, 0, H, W):
            crops += 1
            # Some crop scale puts the crop's sides within crop_min..crop_max (±1 px of rounding).
            ok = False
            for s in aug.crop_scales:
                h1, w1 = resized_size(H, W, s)
                c_h, c_w = ch * h1 / H, cw * w1 / W
                lo_h, lo_w = min(aug.crop_min, h1), min(aug.crop_min, w1)
                if lo_h - 1.5 <= c_h <= min(h1, aug.crop_max) + 1.5 and lo_w - 1.5 <= c_w <= min(w1, aug.crop_max) + 1.5:
                    ok = True
            assert ok, v
    assert 0.4 * n < flips < 0.6 * n
    assert 0.35 * n < crops < 0.6 * n  # crop_p = 0.5 (a crop can occasionally cover everything)


def test_sample_train_view_without_augmentation():
    aug = AugConfig(scales=(128,), max_size=192, flip_p=0.0, crop_p=0.0, eval_size=128)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_train_view(100, 150, aug, g) == View(False, (0, 0, 100, 150), (128, 192))


def test_aug_presets():
    demo = AUG_PRESETS["demo"]
    assert demo.scales == (64,) and demo.max_size == 64 and demo.eval_size == 64 and demo.crop_p == 0.0
    assert AUG_PRESETS["detr"].scales == tuple(range(480, 801, 32)) and AUG_PRESETS["detr"].max_size == 1333
    with pytest.raises(KacliError, match="flip_p"):
        AugConfig(flip_p=1.5)
