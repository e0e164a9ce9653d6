"""Softmax (DETR) and sigmoid (Conditional DETR) classifiers: the focal ground-truth loss, partial
labels for sigmoids, the one rule that turns any teacher into soft targets, and TA for all four
(teacher, student) combinations, each on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kacli.losses.criterion import detection_criterion
from kacli.losses.matcher import focal_cost
from kacli.losses.task import TaskAmalgamationLoss
from kacli.teachers.labels import sigmoid_to_distribution, teacher_logits

A, G = 0.25, 2.0


def sig(x):
    return 1 / (1 + math.exp(-x))


def fl(x, t):
    """Focal loss of one logit x with target t ∈ {0, 1}, by its definition."""
    p = sig(x)
    return -A * (1 - p) ** G * math.log(p) if t else -(1 - A) * p**G * math.log(1 - p)


def bkl(t, x):
    """KL(Bern(t) ‖ Bern(σ(x)))."""
    p = sig(x)
    out = 0.0
    if t > 0:
        out += t * math.log(t / p)
    if t < 1:
        out += (1 - t) * math.log((1 - t) / (1 - p))
    return out


BOX = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
LOGITS = [[1.0, -2.0], [-0.5, 0.3]]  # (Q=2, K=2)


def _outputs(logits=LOGITS, requires_grad=False):
    lg = torch.tensor([logits], requires_grad=requires_grad)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    return {"pred_logits": lg, "pred_boxes": boxes}, lg


def test_focal_loss_is_its_formula_summed_over_queries_and_classes_per_box():
    crit = detection_criterion(2, "sigmoid")
    out, _ = _outputs()
    targets = [{"labels": torch.tensor([1]), "boxes": BOX}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 ↔ the object of class 1
    got = crit.single(out, targets, 1.0, indices=indices)["loss_ce"]
    want = fl(1.0, 0) + fl(-2.0, 1) + fl(-0.5, 0) + fl(0.3, 0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert crit.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # Conditional DETR's


def test_focal_matching_cost_is_the_focal_change_at_the_target_class():
    x = torch.tensor([1.0, -2.0, 0.0])
    want = [A * (1 - sig(v)) ** G * -math.log(sig(v)) - (1 - A) * sig(v) ** G * -math.log(1 - sig(v)) for v in x.tolist()]
    torch.testing.assert_close(focal_cost(x), torch.tensor(want))
    # the matcher takes it at weight 2: query 1 (logit 0.3 on class 1, box far) vs query 0 (box exact)
    crit = detection_criterion(2, "sigmoid")
    out, _ = _outputs()
    cost = crit.matcher.cost_matrices(out, [{"labels": torch.tensor([1]), "boxes": BOX}])[0]
    assert cost[0, 0].item() == pytest.approx(2 * focal_cost(torch.tensor(-2.0)).item() + 0 - 2 * 1.0, rel=1e-5)


def test_an_unlabelled_class_gives_no_focal_term_on_its_image():
    """An image complete for class 0 only: class 1 contributes neither a positive nor a negative
    term, and its logits get no gradient from that image (marginal is the same for sigmoids)."""
    for mode in ("mask", "marginal"):
        crit = detection_criterion(2, "sigmoid", mask_incomplete=mode == "mask", marginal=mode == "marginal")
        out, lg = _outputs(requires_grad=True)
        targets = [{"labels": torch.tensor([0]), "boxes": BOX, "complete": torch.tensor([True, False])}]
        losses = crit(out, targets)
        indices = crit.matcher(out, targets)
        assert indices[0][0].tolist() == [0]
        want = fl(1.0, 1) + fl(-0.5, 0)  # class 0 only: query 0 positive, query 1 negative
        assert losses["loss_ce"].item() == pytest.approx(want, rel=1e-5)
        losses["loss_ce"].backward()
        assert lg.grad[0, :, 1].abs().max() == 0 and lg.grad[0, :, 0].abs().min() > 0
    # the same image complete for both classes: class 1's negatives count again
    crit = detection_criterion(2, "sigmoid", mask_incomplete=True)
    out, _ = _outputs()
    full = crit(out, [{"labels": torch.tensor([0]), "boxes": BOX, "complete": torch.tensor([True, True])}])
    assert full["loss_ce"].item() == pytest.approx(want + fl(-2.0, 0) + fl(0.3, 0), rel=1e-5)


def test_a_sigmoid_teachers_distribution_is_its_probabilities_rescaled_only_above_one():
    # σ(x) = 0.5 and 0.2: they sum to 0.7 → q = (0.5, 0.2), no object 0.3
    x = torch.tensor([0.0, math.log(0.2 / 0.8)])
    torch.testing.assert_close(sigmoid_to_distribution(x).exp(), torch.tensor([0.5, 0.2, 0.3]))
    # 0.9 and 0.6 sum to 1.5 → q = (0.6, 0.4), no object at its floor
    x = torch.tensor([math.log(9), math.log(1.5)])
    q = sigmoid_to_distribution(x).exp()
    torch.testing.assert_close(q[:2], torch.tensor([0.6, 0.4]))
    assert 0 < q[2] <= 1e-12
    # a class outside the task is dropped (not folded into no object as for softmax teachers)
    three = torch.tensor([0.0, 5.0, math.log(0.2 / 0.8)])
    torch.testing.assert_close(teacher_logits(three, "sigmoid", [0, 2]).exp(), torch.tensor([0.5, 0.2, 0.3]))
    # softmax teachers keep their logits (remapped: the rest folded into no object)
    soft = torch.tensor([1.0, 2.0, 0.5, 0.0])
    assert teacher_logits(soft, "softmax", None) is soft
    torch.testing.assert_close(teacher_logits(soft, "softmax", [1]).softmax(-1),
                               torch.stack([soft.softmax(-1)[1], 1 - soft.softmax(-1)[1]]))


def _ta(classifier):
    return TaskAmalgamationLoss(2, alpha=(1.0, 0.0, 0.0), alpha_conf=0.0, beta_kl=1.0, beta_l1=0.0, beta_giou=0.0,
                                threshold=0.1, noobj_weight=1.0, classifier=classifier)


# A teacher of the task {class 1}, one query: softmax teacher with p(class) = 0.8, or sigmoid
# teacher with σ = 0.8; both give the target distribution (class 1: 0.8, no object 0.2).
SOFTMAX_TEACHER = torch.tensor([[[math.log(0.8), math.log(0.2)]]])  # (B=1, Q_t=1, C_t + 1)
SIGMOID_TEACHER = teacher_logits(torch.tensor([[[math.log(4.0)]]]), "sigmoid", None)
TEACHER_BOX = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])


@pytest.mark.parametrize("teacher", ["softmax", "sigmoid"])
def test_ta_softmax_student_learns_the_teachers_distribution(teacher):
    logits = SOFTMAX_TEACHER if teacher == "softmax" else SIGMOID_TEACHER
    student = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])  # (1, Q=2, C+1=3)
    out = {"pred_logits": student, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])}
    losses = _ta("softmax")(out, [logits], [TEACHER_BOX], [torch.tensor([1])])
    p0 = student[0, 0].softmax(-1).tolist()  # query 0 matches (lower KL); target (0, 0.8, 0.2)
    kl = 0.8 * math.log(0.8 / p0[1]) + 0.2 * math.log(0.2 / p0[2])
    assert losses["loss_ta_kl"].item() == pytest.approx(0.8 * kl, rel=1e-5)  # weighted by confidence 0.8
    assert losses["loss_ta_noobj"].item() == pytest.approx(-math.log(student[0, 1].softmax(-1)[2].item()), rel=1e-5)


@pytest.mark.parametrize("teacher", ["softmax", "sigmoid"])
def test_ta_sigmoid_student_learns_each_class_probability(teacher):
    logits = SOFTMAX_TEACHER if teacher == "softmax" else SIGMOID_TEACHER
    student = torch.tensor([[[-1.0, 0.5], [2.0, -3.0]]])  # (1, Q=2, C=2): no "no object" slot
    out = {"pred_logits": student, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])}
    loss = _ta("sigmoid")
    # matching cost: Σ_c binary KL of query i against the target (class 0: 0, class 1: 0.8)
    targets = loss.prepare_targets([logits], [TEACHER_BOX], [torch.tensor([1])])
    cost0, cost1 = bkl(0.0, -1.0) + bkl(0.8, 0.5), bkl(0.0, 2.0) + bkl(0.8, -3.0)
    (rows, cols), = loss.match(out, targets)
    assert rows.tolist() == [0] and cost0 < cost1
    losses = loss(out, [logits], [TEACHER_BOX], [torch.tensor([1])])
    assert losses["loss_ta_kl"].item() == pytest.approx(0.8 * cost0, rel=1e-5)
    # the unmatched query: every class to 0, −Σ_c log(1 − σ(x_c))
    assert losses["loss_ta_noobj"].item() == pytest.approx(-math.log(1 - sig(2.0)) - math.log(1 - sig(-3.0)), rel=1e-5)
    # the KL is zero when the student's probabilities are the target's
    exact = {"pred_logits": torch.tensor([[[-30.0, math.log(4.0)], [-30.0, -30.0]]]), "pred_boxes": out["pred_boxes"]}
    assert loss(exact, [logits], [TEACHER_BOX], [torch.tensor([1])])["loss_ta_kl"].item() < 1e-6


def test_a_sigmoid_student_takes_no_temperature():
    with pytest.raises(ValueError, match="temperature"):
        TaskAmalgamationLoss(2, temperature=2.0, classifier="sigmoid")
    with pytest.raises(ValueError, match="expected 2"):
        _ta("sigmoid")({"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.zeros(1, 2, 4)},
                       [SOFTMAX_TEACHER], [TEACHER_BOX], [torch.tensor([1])])
