"""Hungarian matcher and set criterion on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kacli.errors import KacliError
from kacli.losses import HungarianMatcher, SetCriterion


def _t(labels, boxes):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def test_matcher_assignment_forced_by_class_cost():
    # Both queries predict the same box, so only the class term separates them.
    # q0 logits (0, ln3, 0) → p = (.2, .6, .2); q1 logits (ln4, 0, 0) → p = (2/3, 1/6, 1/6).
    # t0: class 0, box (.5,.5,.2,.2) = the query box → L1 0, GIoU 1.
    # t1: class 1, box (.5,.5,.4,.4) → L1 .4, GIoU = IoU = .04/.16 = .25 (nested, enclosing = union).
    # cost = −p + 5·L1 − 2·GIoU:
    #   q0–t0 = −.2 − 2 = −2.2        q0–t1 = −.6 + 2 − .5 = 0.9
    #   q1–t0 = −2/3 − 2 = −2.6667    q1–t1 = −1/6 + 2 − .5 = 1.3333
    # identity −2.2 + 1.3333 = −0.8667 > swap 0.9 − 2.6667 = −1.7667 → q0↔t1, q1↔t0.
    outputs = {
        "pred_logits": torch.tensor([[[0.0, math.log(3), 0.0], [math.log(4), 0.0, 0.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]]),
    }
    targets = [_t([0, 1], [[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])]
    matcher = HungarianMatcher(1, 5, 2)
    (cost,) = matcher.cost_matrices(outputs, targets)
    expected = torch.tensor([[-2.2, 0.9], [-2 / 3 - 2, -1 / 6 + 1.5]])
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=0)
    ((src, tgt),) = matcher(outputs, targets)
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    assert src.tolist() == [0, 1] and tgt.tolist() == [1, 0]


def test_matcher_l1_and_giou_weights_choose_different_assignments():
    # All boxes span y ∈ [.4,.6] (cy .5, h .2); x intervals: A=[.2,.8] B=[.1,.2] X=[.1,.6] Y=[.7,.8].
    # (cx, w): A (.5,.6) B (.15,.1) X (.35,.5) Y (.75,.1).
    # L1: X–A .15+.1=.25  X–B .2+.4=.6  Y–A .25+.5=.75  Y–B .6+0=.6
    #   identity (X–A, Y–B) .85 < swap (X–B, Y–A) 1.35.
    # GIoU (same heights → 1-D lengths): X–A inter .4 union .7 → 4/7; X–B inter .1 union .5 → .2;
    #   Y–A inter .1 union .6 → 1/6; Y–B disjoint, union .2, enclosing .7 → −(.7−.2)/.7 = −5/7.
    #   −GIoU: identity −4/7 + 5/7 = 1/7 > swap −.2 − 1/6 = −.3667 → GIoU prefers the swap.
    outputs = {
        "pred_logits": torch.zeros(1, 2, 3),  # same class probabilities everywhere
        "pred_boxes": torch.tensor([[[0.35, 0.5, 0.5, 0.2], [0.75, 0.5, 0.1, 0.2]]]),
    }
    targets = [_t([0, 1], [[0.5, 0.5, 0.6, 0.2], [0.15, 0.5, 0.1, 0.2]])]

    (l1,) = HungarianMatcher(0, 1, 0).cost_matrices(outputs, targets)
    torch.testing.assert_close(l1, torch.tensor([[0.25, 0.6], [0.75, 0.6]]), atol=1e-5, rtol=0)
    (giou,) = HungarianMatcher(0, 0, 1).cost_matrices(outputs, targets)
    torch.testing.assert_close(giou, torch.tensor([[-4 / 7, -0.2], [-1 / 6, 5 / 7]]), atol=1e-5, rtol=0)

    ((s, t),) = HungarianMatcher(0, 1, 0)(outputs, targets)
    assert t[s.argsort()].tolist() == [0, 1]
    ((s, t),) = HungarianMatcher(0, 0, 1)(outputs, targets)
    assert t[s.argsort()].tolist() == [1, 0]
    # DETR's weights (L1 5, GIoU 2): identity 5·.85 + 2/7 = 4.54 < swap 6.75 − .73 = 6.02.
    ((s, t),) = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert t[s.argsort()].tolist() == [0, 1]


def test_matcher_handles_images_without_targets_and_more_targets_than_queries():
    outputs = {"pred_logits": torch.zeros(3, 2, 4), "pred_boxes": torch.full((3, 2, 4), 0.3)}
    targets = [
        _t([], []),
        _t([0, 1, 2], [[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1], [0.2, 0.3, 0.3, 0.3]]),
        _t([2], [[0.3, 0.3, 0.3, 0.3]]),
    ]
    m = HungarianMatcher()(outputs, targets)
    assert [len(s) for s, _ in m] == [0, 2, 1]
    assert all(s.dtype == torch.int64 and t.dtype == torch.int64 for s, t in m)
    assert set(m[1][1].tolist()) <= {0, 1, 2} and len(set(m[1][1].tolist())) == 2
    # No targets anywhere.
    m = HungarianMatcher()(outputs, [_t([], [])] * 3)
    assert all(len(s) == 0 == len(t) for s, t in m)


def _hand_case():
    # K = 2 classes (+ no-object at index 2), 2 images × 2 queries.
    # image 0: q0 logits (ln2,0,0) → p (.5,.25,.25), box (.5,.5,.4,.2)
    #          q1 logits (0,0,ln3) → p (.2,.2,.6),   box (.2,.2,.2,.2)
    #          target: class 0, box (.5,.5,.4,.4) → xyxy (.3,.3,.7,.7)
    # image 1: q0 logits (0,0,0) → p_noobj 1/3; q1 logits (0,0,ln3) → p_noobj .6; no targets.
    logits = torch.tensor(
        [
            [[math.log(2), 0.0, 0.0], [0.0, 0.0, math.log(3)]],
            [[0.0, 0.0, 0.0], [0.0, 0.0, math.log(3)]],
        ]
    )
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.4, 0.2], [0.2, 0.2, 0.2, 0.2]],
            [[0.5, 0.5, 0.3, 0.3], [0.6, 0.6, 0.2, 0.2]],
        ]
    )
    targets = [_t([0], [[0.5, 0.5, 0.4, 0.4]]), _t([], [])]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


# Matching image 0: q0: −.5 + 5·.2 + 2·(−.5) = −.5; q1 (xyxy (.1,.1,.3,.3), corner contact):
# L1 .3+.3+.2+.2 = 1, GIoU = 0 − (.36 − .2)/.36 = −4/9 → −.2 + 5 + .889 = 5.689 → q0 is matched.
# loss_ce = [−ln .5 + .1·(−ln .6 − ln(1/3) − ln .6)] / (1 + 3·.1)
#         = [.693147 + .1·(.510826 + 1.098612 + .510826)] / 1.3 = .905174 / 1.3 = .696287
# q0 box (.5,.5,.4,.2) → xyxy (.3,.4,.7,.6), inside the target: L1 = .2, IoU = .08/.16 = .5 = GIoU.
HAND_CE = 0.696287
HAND_BBOX = 0.2
HAND_GIOU = 0.5


def test_criterion_equals_hand_computation():
    outputs, targets = _hand_case()
    crit = SetCriterion(2, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, eos_coef=0.1)
    losses = crit(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(HAND_CE, abs=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(HAND_BBOX, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(HAND_GIOU, abs=1e-5)
    assert losses["total"].item() == pytest.approx(HAND_CE + 5 * HAND_BBOX + 2 * HAND_GIOU, abs=1e-5)
    assert losses["class_error"].item() == 0.0
    assert not any(k.endswith("_0") for k in losses)


def test_criterion_aux_outputs_and_num_boxes_normalisation():
    outputs, targets = _hand_case()
    crit = SetCriterion(2, HungarianMatcher())
    # Same predictions as an auxiliary layer: suffixed copies, counted in the total.
    aux = dict(outputs, aux_outputs=[{k: v.clone() for k, v in outputs.items()}])
    losses = crit(aux, targets)
    for name, hand in (("loss_ce", HAND_CE), ("loss_bbox", HAND_BBOX), ("loss_giou", HAND_GIOU)):
        assert losses[f"{name}_0"].item() == pytest.approx(hand, abs=1e-5)
    assert losses["total"].item() == pytest.approx(2 * (HAND_CE + 1 + 1), abs=1e-5)
    assert "class_error_0" not in losses

    # The batch twice: 2 boxes, box losses are sums / 2 → unchanged; CE is a weighted mean → unchanged.
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    losses2 = crit(doubled, targets + targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses2[name].item() == pytest.approx(crit(outputs, targets)[name].item(), abs=1e-6)

    # A wrongly classified matched query: class_error 100.
    wrong = {"pred_logits": outputs["pred_logits"].clone(), "pred_boxes": outputs["pred_boxes"]}
    wrong["pred_logits"][0, 0] = torch.tensor([0.0, 2.0, 0.0])
    assert crit(wrong, targets)["class_error"].item() == 100.0


def test_criterion_no_targets_and_bad_labels():
    outputs, _ = _hand_case()
    crit = SetCriterion(2, HungarianMatcher())
    empty = [_t([], []), _t([], [])]
    losses = crit(outputs, empty)
    # Every query is "no object"; all weights are .1 so the weighted mean is the plain mean of −ln p_noobj.
    expected = (math.log(4) + math.log(5 / 3) + math.log(3) + math.log(5 / 3)) / 4
    assert losses["loss_ce"].item() == pytest.approx(expected, abs=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    with pytest.raises(KacliError, match="label out of range"):
        crit(outputs, [_t([2], [[0.5, 0.5, 0.1, 0.1]]), _t([], [])])
    with pytest.raises(KacliError, match="unknown loss weight"):
        SetCriterion(2, HungarianMatcher(), {"loss_focal": 1})


class _TwoRanks:
    """torch.distributed as one of two ranks sees it; the other rank counted ``other``."""

    def __init__(self, other: float):
        self.other = other

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, t):
        t += self.other


def test_box_and_pair_counts_are_averaged_over_ranks_and_clamped_to_one(monkeypatch):
    """DETR's num_boxes and TA's num_pairs: every rank divides by the same count, the mean over ranks
    (one helper for both), at least 1."""
    from kacli import runtime
    from kacli.losses.criterion import num_boxes_across_ranks
    from kacli.losses.task import TaskAmalgamationLoss

    assert num_boxes_across_ranks([_t([], [])], torch.device("cpu")) == 1.0  # one process, no boxes
    ta = TaskAmalgamationLoss(num_classes=3)
    pairs = [{"conf": torch.ones(5)}, {"conf": torch.ones(1)}]  # min(Q=3, 5) + min(3, 1) = 4 pairs here
    monkeypatch.setattr(runtime, "dist", _TwoRanks(other=3.0))
    assert num_boxes_across_ranks([_t([0, 1], [[0.5] * 4] * 2)], torch.device("cpu")) == 2.5  # (2 + 3) / 2
    assert ta.num_pairs(pairs, 3, torch.device("cpu")).item() == 3.5  # (4 + 3) / 2
    monkeypatch.setattr(runtime, "dist", _TwoRanks(other=0.0))
    assert num_boxes_across_ranks([_t([0], [[0.5] * 4])], torch.device("cpu")) == 1.0  # 0.5 → 1
    assert ta.num_pairs([{"conf": torch.ones(1)}], 3, torch.device("cpu")).item() == 1.0
