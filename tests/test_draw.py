"""Boxes, labels and the legend land where they should, in the group's colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kacli.draw import PALETTE, draw_detections

GREY = 50


def grey(h=96, w=128) -> torch.Tensor:
    return torch.full((3, h, w), GREY, dtype=torch.uint8)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def test_box_outline_in_the_group_colour_and_interior_untouched():
    red = (255, 0, 0)
    out = pixels(draw_detections(grey(), [{"boxes": [[20, 40, 60, 80]], "labels": ["cat"], "scores": [0.87], "color": red, "name": "t1"}]))
    assert out.shape == (96, 128, 3)
    for x, y in [(20, 60), (60, 60), (40, 40), (40, 80)]:  # the four sides
        assert tuple(out[y, x]) == red, (x, y)
    assert (out[50:75, 25:55] == GREY).all()  # inside the box
    assert (out[85:, :] == GREY).all() and (out[:, 70:] == GREY).all()  # away from box and label
    # The label "cat 0.87" sits in a filled red box just above the box's top edge.
    above = out[:40, 20:80]
    assert (above == red).all(axis=-1).sum() > 50
    assert (above != GREY).any(axis=-1).sum() > (above == red).all(axis=-1).sum()  # text drawn on it


def test_groups_take_distinct_palette_colours_and_get_a_legend():
    groups = [
        {"boxes": torch.tensor([[10.0, 50.0, 40.0, 90.0]]), "labels": ["a"], "scores": None, "name": "teacher-t1"},
        {"boxes": torch.tensor([[70.0, 50.0, 110.0, 90.0]]), "labels": ["b"], "scores": torch.tensor([0.5]), "name": "student"},
    ]
    out = pixels(draw_detections(grey(), groups))
    assert tuple(out[70, 10]) == PALETTE[0]
    assert tuple(out[70, 110]) == PALETTE[1]
    assert PALETTE[0] != PALETTE[1]
    # Legend: a white panel in the top-right corner holding both colours as swatches.
    corner = out[:30, 64:]
    assert (corner == 255).all(axis=-1).sum() > 100
    assert (corner == PALETTE[0]).all(axis=-1).any() and (corner == PALETTE[1]).all(axis=-1).any()
    # One group: no legend.
    single = pixels(draw_detections(grey(), groups[1:]))
    assert (single[:30, 64:] == 255).all(axis=-1).sum() < (corner == 255).all(axis=-1).sum() / 4


def test_tensor_and_pil_inputs_draw_the_same_and_input_is_untouched():
    t = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    pil = Image.fromarray(t.permute(1, 2, 0).numpy())
    before = np.asarray(pil).copy()
    groups = [{"boxes": [[5, 5, 30, 30]], "labels": ["x"], "scores": [0.25], "name": "m"}]
    a, b = draw_detections(t, groups), draw_detections(pil, groups)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(pil), before)
    assert not np.array_equal(np.asarray(a), before)


def test_min_size_enlarges_small_images_and_their_boxes():
    out = draw_detections(grey(32, 48), [{"boxes": [[8, 8, 16, 16]], "labels": [""], "color": (0, 255, 0), "name": "m"}], min_size=96)
    assert out.size == (144, 96)
    assert tuple(pixels(out)[36, 24]) == (0, 255, 0)  # left side at x = 8×3, y = 12×3


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(torch.zeros(3, 8, 8), [])
    with pytest.raises(ValueError, match="labels"):
        draw_detections(grey(), [{"boxes": [[0, 0, 4, 4]], "labels": ["a", "b"], "name": "m"}])
