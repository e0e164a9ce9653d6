"""Ground-truth losses on partially annotated images (mask, marginal, pseudo-gt) and hard pseudo-labels."""

from __future__ import annotations

import math

import pytest
import torch

from kacli.errors import KacliError
from kacli.losses import GroundTruthLoss, HungarianMatcher, SetCriterion
from kacli.losses.partial import mask_logits, valid_classes
from kacli.losses.pseudo import augment_targets, hard_pseudo_targets, teacher_predictions


def _t(labels, boxes, complete=None):
    t = {"labels": torch.tensor(labels, dtype=torch.int64),
         "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}
    if complete is not None:
        t["complete"] = torch.tensor(complete, dtype=torch.bool)
    return t


# -- mask ------------------------------------------------------------------------------------------

# 3 classes + no-object, 3 queries, one target of class 0 at box T. Logits are logs of these weights:
#   q0 (2, 20, 1, 1) box T      masked (class 1 out): (2, ·, 1, 1)/4 → p0 .5,  p_no .25
#                                unmasked: /24        → p0 1/12
#   q1 (3, 1, 3, 3)  box T      masked: (3, ·, 3, 3)/9 → p0 1/3, p_no 1/3;  unmasked /10 → p0 .3
#   q2 (1, 1, 2, 5)  far box    masked: /8 → p_no 5/8;                      unmasked /9 → p_no 5/9
# q0 and q1 have the target's box, so the class cost −p0 alone picks the match:
#   masked (image complete for 0 and 2 only): q0 (.5 > 1/3); unmasked: q1 (.3 > 1/12).
# Image 0 is incomplete for class 1, image 1 (same predictions, same target) is complete.
T = [0.3, 0.3, 0.2, 0.2]
WEIGHTS = [[2.0, 20.0, 1.0, 1.0], [3.0, 1.0, 3.0, 3.0], [1.0, 1.0, 2.0, 5.0]]
BOXES = [T, T, [0.8, 0.8, 0.1, 0.1]]
# CE = Σ w_i·ce_i / Σ w_i, w = 1 for the matched query, .1 for the two others (eos_coef .1).
IMG_MASKED = math.log(2) + 0.1 * math.log(3) + 0.1 * math.log(8 / 5)  # q0 matched; q1, q2 → no object
IMG_FULL = math.log(10 / 3) + 0.1 * math.log(24) + 0.1 * math.log(9 / 5)  # q1 matched; q0, q2 → no object


def _mask_case():
    logits = torch.log(torch.tensor([WEIGHTS, WEIGHTS])).requires_grad_(True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([BOXES, BOXES])}
    targets = [_t([0], [T], [True, False, True]), _t([0], [T], [True, True, True])]
    return outputs, targets


def test_mask_loss_equals_hand_computation_on_a_partial_image():
    outputs, targets = _mask_case()
    masked = GroundTruthLoss(3, "mask", eos_coef=0.1)(outputs, targets)
    assert masked["loss_ce"].item() == pytest.approx((IMG_MASKED + IMG_FULL) / 2.4, abs=1e-6)
    assert masked["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    none = GroundTruthLoss(3, "none", eos_coef=0.1)(outputs, targets)
    assert none["loss_ce"].item() == pytest.approx(2 * IMG_FULL / 2.4, abs=1e-6)

    # The matcher's class cost is −p over the same masked softmax: q0 on image 0, q1 on image 1.
    crit = SetCriterion(3, HungarianMatcher(), eos_coef=0.1, mask_incomplete=True)
    valid = valid_classes(targets, 3)
    assert valid.tolist() == [[True, False, True, True], [True] * 4]
    (c0, c1) = crit.matcher.cost_matrices({"pred_logits": mask_logits(outputs["pred_logits"], valid),
                                           "pred_boxes": outputs["pred_boxes"]}, targets)
    assert c0[:2, 0].tolist() == pytest.approx([-0.5 - 2, -1 / 3 - 2], abs=1e-6)
    assert c1[:2, 0].tolist() == pytest.approx([-1 / 12 - 2, -0.3 - 2], abs=1e-6)
    assert [s.tolist() for s, _ in crit.matcher({"pred_logits": mask_logits(outputs["pred_logits"], valid),
                                                   "pred_boxes": outputs["pred_boxes"]}, targets)] == [[0], [1]]

    # The incomplete class is not taught anything on image 0, and still is on image 1.
    masked["loss_ce"].backward()
    grad = outputs["pred_logits"].grad
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[0, :, 1], torch.zeros(3))
    assert (grad[1, :, 1] > 0).all()  # pushed down towards no-object / class 0


def test_mask_keeps_a_labelled_class_even_when_not_complete():
    # An annotation of class 1 on an image not complete for classes 1 and 2: class 1 stays in its
    # softmax (finite loss), only class 2 is left out — the same as declaring the image complete for 1.
    outputs, _ = _mask_case()
    targets = [_t([1], [T], [True, False, False]), _t([0], [T])]
    assert valid_classes(targets, 3).tolist() == [[True, True, False, True], [True] * 4]
    crit = SetCriterion(3, HungarianMatcher(), mask_incomplete=True)
    got = crit(outputs, targets)
    assert math.isfinite(got["loss_ce"].item())
    same = crit(outputs, [_t([1], [T], [True, True, False]), _t([0], [T])])
    assert torch.equal(got["loss_ce"], same["loss_ce"])
    plain = SetCriterion(3, HungarianMatcher())(outputs, targets)
    assert abs(got["loss_ce"].item() - plain["loss_ce"].item()) > 1e-3
    with pytest.raises(KacliError, match="'complete' has shape"):
        crit(outputs, [_t([0], [T], [True, True]), _t([0], [T])])


# -- marginal --------------------------------------------------------------------------------------

# 3 classes + no-object (∅), one image complete for classes 0 and 2 (class 1 unlabelled), one target
# of class 0 at box T. Logits are logs of these weights (c0, c1, c2, ∅):
#   q0 (6, 1, 1, 2) box T    matched: masked softmax /9 → p0 = 6/9, ce = log(3/2) (mask and marginal)
#   q1 (1, 4, 1, 2) far      unmatched: full /8 → p_∅ + p_1 = 6/8, marginal term log(4/3);
#                                       mask: /4 → p_∅ = 2/4, ce log 2
#   q2 (1, 1, 2, 4) far      unmatched: full /8 → p_∅ + p_1 = 5/8, log(8/5); mask: /7 → log(7/4)
# Weights 1 (matched) and eos_coef .1 (unmatched), divided by their sum 1.2.
# The auxiliary output differs in q1 only: (1, 2, 1, 1) → full /5, p_∅ + p_1 = 3/5, log(5/3).
M_WEIGHTS = [[6.0, 1.0, 1.0, 2.0], [1.0, 4.0, 1.0, 2.0], [1.0, 1.0, 2.0, 4.0]]
M_AUX = [[6.0, 1.0, 1.0, 2.0], [1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 4.0]]
M_BOXES = [T, [0.8, 0.8, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]
MARGINAL = (math.log(3 / 2) + 0.1 * math.log(4 / 3) + 0.1 * math.log(8 / 5)) / 1.2
MARGINAL_AUX = (math.log(3 / 2) + 0.1 * math.log(5 / 3) + 0.1 * math.log(8 / 5)) / 1.2
MASKED = (math.log(3 / 2) + 0.1 * math.log(2) + 0.1 * math.log(7 / 4)) / 1.2


def _marginal_case():
    logits = torch.log(torch.tensor([M_WEIGHTS])).requires_grad_(True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([M_BOXES]),
               "aux_outputs": [{"pred_logits": torch.log(torch.tensor([M_AUX])),
                                "pred_boxes": torch.tensor([M_BOXES])}]}
    return outputs, [_t([0], [T], [True, False, True])]


def test_marginal_loss_equals_hand_computation_on_a_partial_image():
    outputs, targets = _marginal_case()
    got = GroundTruthLoss(3, "marginal", eos_coef=0.1)(outputs, targets)
    assert got["loss_ce"].item() == pytest.approx(MARGINAL, abs=1e-6)
    assert got["loss_ce_0"].item() == pytest.approx(MARGINAL_AUX, abs=1e-6)  # the auxiliary layer alike
    assert got["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)  # q0, on the target's box, is matched
    assert got["total"].item() == pytest.approx(MARGINAL + MARGINAL_AUX, abs=1e-5)  # box losses 0
    masked = GroundTruthLoss(3, "mask", eos_coef=0.1)(outputs, targets)
    assert masked["loss_ce"].item() == pytest.approx(MASKED, abs=1e-6)
    # the same matching as mask: the box losses are the same
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert torch.equal(got[key], masked[key]), key


def _unlabelled_step(mode: str, lr: float = 12.0) -> tuple[torch.Tensor, float]:
    """The gradient of loss_ce w.r.t. the logits (1, 3, 4) and p(class 1) of q1 over the full softmax
    after one SGD step of ``lr`` on the logits."""
    outputs, targets = _marginal_case()
    del outputs["aux_outputs"]
    GroundTruthLoss(3, mode, eos_coef=0.1)(outputs, targets)["loss_ce"].backward()
    logits = outputs["pred_logits"]
    stepped = logits.detach() - lr * logits.grad
    return logits.grad, stepped.softmax(-1)[0, 1, 1].item()


def test_marginal_does_not_teach_an_unmatched_query_away_from_an_unlabelled_class():
    # d loss/d z = (eos_coef / 1.2)·(p − p·[c ∈ A] / P_A) for the unmatched q1 under marginal, with
    # p = (1, 4, 1, 2)/8, A = {c1, ∅}, P_A = 6/8: (1/12)·(1/8, −1/6, 1/8, −1/12).
    # Mask: (1/12)·(p_masked − onehot(∅)) with p_masked = (1, ·, 1, 2)/4 and no gradient at c1.
    marginal, p_marginal = _unlabelled_step("marginal")
    mask, p_mask = _unlabelled_step("mask")
    torch.testing.assert_close(marginal[0, 1], torch.tensor([1 / 8, -1 / 6, 1 / 8, -1 / 12]) / 12)
    torch.testing.assert_close(mask[0, 1], torch.tensor([1 / 4, 0.0, 1 / 4, -1 / 2]) / 12)
    assert mask[0, 1, 1].item() == 0.0
    # The matched q0 gets the same gradient from both: masked softmax (6, ·, 1, 2)/9 − onehot(c0), /1.2.
    torch.testing.assert_close(marginal[0, 0], mask[0, 0])
    torch.testing.assert_close(mask[0, 0], torch.tensor([6 / 9 - 1, 0.0, 1 / 9, 2 / 9]) / 1.2)
    # One SGD step (lr 12, so the step is 12·gradient): p(c1) of q1, 1/2 before, falls under mask
    # (c1 unchanged, ∅ raised by 1/2, c0 and c2 lowered by 1/4) and rises under marginal.
    e = math.exp
    mask_after = 4 / (2 * e(-1 / 4) + 4 + 2 * e(1 / 2))
    marginal_after = 4 * e(1 / 6) / (2 * e(-1 / 8) + 4 * e(1 / 6) + 2 * e(1 / 12))
    assert p_mask == pytest.approx(mask_after, abs=1e-6) and mask_after == pytest.approx(0.4517, abs=1e-4)
    assert p_marginal == pytest.approx(marginal_after, abs=1e-6) and marginal_after == pytest.approx(0.5454, abs=1e-4)


def test_marginal_on_random_partial_images_keeps_the_matching_of_mask():
    outputs, targets, _, _ = _random_batch(2)
    targets[0]["complete"] = torch.tensor([True, True, False, False])
    targets[2]["complete"] = torch.tensor([False, False, True, True])
    marginal = GroundTruthLoss(4, "marginal")(outputs, targets)
    masked = GroundTruthLoss(4, "mask")(outputs, targets)
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0", "class_error"):
        assert torch.equal(marginal[key], masked[key]), key
    assert abs(marginal["loss_ce"].item() - masked["loss_ce"].item()) > 1e-3
    assert math.isfinite(marginal["total"].item())


def _random_batch(seed: int, complete: bool = True):
    """3 images × 6 queries, 4 classes, one auxiliary output, 2/0/3 targets; two teachers."""
    g = torch.Generator().manual_seed(seed)
    B, Q, C = 3, 6, 4
    logits = torch.randn(B, Q, C + 1, generator=g)
    centres = torch.rand(B, Q, 2, generator=g) * 0.5 + 0.25
    sizes = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes], -1)}
    outputs["aux_outputs"] = [{"pred_logits": logits + 0.3 * torch.randn(B, Q, C + 1, generator=g),
                               "pred_boxes": outputs["pred_boxes"].clone()}]
    targets = []
    for m in (2, 0, 3):
        labels = torch.randint(0, C, (m,), generator=g)
        boxes = torch.cat([torch.rand(m, 2, generator=g) * 0.5 + 0.25, torch.rand(m, 2, generator=g) * 0.3 + 0.05], -1)
        t = {"labels": labels, "boxes": boxes}
        if complete:
            t["complete"] = torch.ones(C, dtype=torch.bool)
        targets.append(t)
    # teachers: one with classes (0, 1), one with (2, 3); confident boxes everywhere
    teacher = {"logits": [torch.randn(B, 5, 3, generator=g) * 4, torch.randn(B, 4, 3, generator=g) * 4],
               "boxes": [torch.rand(B, 5, 4, generator=g) * 0.3 + 0.2, torch.rand(B, 4, 4, generator=g) * 0.3 + 0.2]}
    return outputs, targets, teacher, [[0, 1], [2, 3]]


def test_every_mode_equals_the_plain_criterion_on_complete_images():
    outputs, targets, teacher, class_index = _random_batch(0)
    ref = SetCriterion(4, HungarianMatcher(), eos_coef=0.1)(outputs, targets)
    assert ref["loss_ce"].item() > 0 and ref["loss_bbox"].item() > 0
    for mode in ("none", "mask", "marginal", "pseudo-gt"):
        got = GroundTruthLoss(4, mode, class_index=class_index, eos_coef=0.1, threshold=0.0)(outputs, targets, teacher)
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), (mode, key)
    # targets without "complete" are complete for every class
    outputs, targets, teacher, class_index = _random_batch(0, complete=False)
    for mode in ("mask", "marginal"):
        got = GroundTruthLoss(4, mode)(outputs, targets)
        for key in ref:
            assert torch.equal(got[key], ref[key]), (mode, key)


def test_pseudo_gt_matches_against_ground_truth_plus_teacher_boxes():
    # Image 0 is annotated for classes 0, 1 (teacher A's); teacher B (class 2, 3) sees a confident 3.
    outputs, _, _, _ = _random_batch(1)
    outputs = {k: v[:1] for k, v in outputs.items() if k != "aux_outputs"}
    targets = [_t([0], [[0.4, 0.4, 0.2, 0.2]], [True, True, False, False])]
    b_logits = torch.log(torch.tensor([[[0.05, 0.9, 0.05], [0.3, 0.3, 0.4]]]))  # B's classes (2, 3) + no object
    a_logits = torch.log(torch.tensor([[[0.1, 0.85, 0.05]]]))  # class 1 at .85: complete here, not added
    teacher = {"logits": [a_logits, b_logits],
               "boxes": [torch.tensor([[[0.4, 0.4, 0.2, 0.2]]]),
                         torch.tensor([[[0.7, 0.6, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])]}
    loss = GroundTruthLoss(4, "pseudo-gt", class_index=[[0, 1], [2, 3]], threshold=0.5)
    got = loss(outputs, targets, teacher)
    hand = [_t([0, 3], [[0.4, 0.4, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])]
    ref = SetCriterion(4, HungarianMatcher())(outputs, hand)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    plain = SetCriterion(4, HungarianMatcher())(outputs, targets)
    assert got["loss_bbox"].item() != pytest.approx(plain["loss_bbox"].item(), abs=1e-4)
    with pytest.raises(ValueError, match="teachers' predictions"):
        loss(outputs, targets)
    with pytest.raises(ValueError, match="unknown ground-truth loss"):
        GroundTruthLoss(4, "ignore")


# -- hard pseudo-labels ----------------------------------------------------------------------------


def test_hard_pseudo_targets_are_the_thresholded_teacher_predictions():
    # Student classes 0, 1 (teacher A, source A) and 2 (teacher B, source B); threshold .5, NMS IoU .7.
    # Probabilities are given as logs, so the softmax gives them back.
    A = torch.log(torch.tensor([
        [[0.03, 0.95, 0.02], [0.1, 0.1, 0.8], [0.05, 0.9, 0.05]],   # image 0 (source A)
        [[0.03, 0.9, 0.07], [0.6, 0.1, 0.3], [0.55, 0.05, 0.4]],    # image 1 (source B)
    ]))
    A_boxes = torch.tensor([
        [[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]],
        [[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2], [0.61, 0.6, 0.2, 0.2]],  # last two: IoU ≈ .90
    ])
    B = torch.log(torch.tensor([
        [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]],
        [[0.95, 0.05], [0.2, 0.8], [0.2, 0.8]],
    ]))
    B_boxes = torch.tensor([
        [[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.2, 0.7, 0.1, 0.1]],  # first two: IoU ≈ .95
        [[0.7, 0.2, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]],
    ])
    gt0 = [[0.25, 0.2, 0.2, 0.2]]
    gt1 = [[0.7, 0.2, 0.2, 0.2]]
    targets = [_t([1], gt0, [True, True, False]), _t([2], gt1, [False, False, True])]
    out = hard_pseudo_targets(targets, [A, B], [A_boxes, B_boxes], [[0, 1], [2]], 3, threshold=0.5, iou_threshold=0.7)
    # Image 0 (complete for 0, 1): A's class-1 boxes are ground truth's business → not added;
    #   B's class 2 at .9 and .8 overlap (IoU > .7) → only the .9 one; B's .3 is below threshold.
    assert out[0]["labels"].tolist() == [1, 2]
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([gt0[0], [0.5, 0.5, 0.4, 0.4]]))
    assert out[0]["pseudo"].tolist() == [False, True]
    # Image 1 (complete for 2): A's class 1 at .9 and class 0 at .6 and .55 (IoU ≈ .90 → the .6 one);
    #   B's class 2 boxes are not added (complete). Ground truth first, then by decreasing score.
    assert out[1]["labels"].tolist() == [2, 1, 0]
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([gt1[0], [0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]))
    assert out[1]["pseudo"].tolist() == [False, True, True]
    assert torch.equal(out[1]["complete"], targets[1]["complete"]) and len(targets[1]["labels"]) == 1

    # The same from hard labels and scores.
    probs, boxes = teacher_predictions([A, B], [A_boxes, B_boxes], [[0, 1], [2]], 3)
    assert probs.shape == (2, 6, 4) and boxes.shape == (2, 6, 4)
    scores, labels = probs[..., :3].max(-1)
    again = augment_targets(targets, boxes, teacher_labels=labels, teacher_scores=scores, num_classes=3,
                            threshold=0.5, iou_threshold=0.7)
    for x, y in zip(out, again):
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["boxes"], y["boxes"])

    # Threshold 0.85: image 1 keeps only A's class 1 at .9; image 0 B's .9.
    high = hard_pseudo_targets(targets, [A, B], [A_boxes, B_boxes], [[0, 1], [2]], 3, threshold=0.85)
    assert [t["labels"].tolist() for t in high] == [[1, 2], [2, 1]]


def test_pseudo_boxes_duplicating_ground_truth_of_their_class_are_dropped():
    # Image complete for class 0 only, but it carries one annotation of class 1 (not exhaustive).
    # Teacher boxes of class 1: one on that annotation (IoU ≈ .82 → dropped), one elsewhere (added);
    # one of class 2 on the same place as the annotation (another class → added).
    targets = [_t([1], [[0.5, 0.5, 0.2, 0.2]], [True, False, False])]
    probs = torch.tensor([[[0.0, 0.9, 0.0, 0.1], [0.0, 0.8, 0.0, 0.2], [0.0, 0.0, 0.7, 0.3]]])
    boxes = torch.tensor([[[0.51, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    (out,) = augment_targets(targets, boxes, probs, threshold=0.5)
    assert out["labels"].tolist() == [1, 1, 2]
    torch.testing.assert_close(out["boxes"][1:], boxes[0, 1:])
    # A target without "complete" gets nothing added.
    (same,) = augment_targets([_t([1], [[0.5, 0.5, 0.2, 0.2]])], boxes, probs)
    assert same["labels"].tolist() == [1] and same["pseudo"].tolist() == [False]
