"""SA (Eq. 2), SAG (Eq. 5) and TA (Eq. 9–11) on hand-built tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kacli.losses.sequence import SAGProjection, channel_stats, sa_loss, sag_loss, standardize
from kacli.losses.task import TaskAmalgamationLoss, pad_teacher_probs, pool_teachers, temper

# ----------------------------------------------------------------------------- SA / SAG


def _hand_layer():
    """B = 1, N = 2, n = 3 (the last token is padding), d = 2."""
    s = torch.tensor([[[[1.0, 2.0], [0.0, 1.0], [9.0, 9.0]],
                       [[2.0, 0.0], [1.0, 1.0], [9.0, 9.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-7.0, 3.0]],
                       [[0.0, 0.0], [3.0, 1.0], [4.0, 4.0]]]])
    mask = torch.tensor([[False, False, True]])
    return s, t, mask


def test_sa_loss_equals_eq2_by_hand_without_normalisation():
    s, t, mask = _hand_layer()
    # part 0: (1,2)-(1,0) → 0² + 2² = 4; (0,1)-(0,1) → 0.  part 1: (2,0)-(0,0) → 4; (1,1)-(3,1) → 4.
    # ‖Y_S − Y_T‖_F² = 12 over valid tokens; Eq. 2: (1/N)·12 = 6. Second layer: student == teacher → 0.
    total, parts = sa_loss([s, t], [t, t], mask, num_parts=2, normalize=False, reduction="sum")
    assert parts["sa_proj"].item() == pytest.approx(6.0)
    assert parts["sa_enc1"].item() == 0.0
    assert total.item() == pytest.approx(6.0)
    # per valid token: V = 2 valid positions → 6 / 2 = 3; per element (the default): 3 / d = 1.5
    total, parts = sa_loss([s], [t], mask, num_parts=2, normalize=False, names=["proj"], reduction="token")
    assert list(parts) == ["proj"] and total.item() == pytest.approx(3.0)
    assert sa_loss([s], [t], mask, num_parts=2, normalize=False)[0].item() == pytest.approx(1.5)


def test_sa_loss_leaves_out_the_layers_a_teacher_does_not_give():
    """An RT-DETR folder gives the last layer only: its part's other terms are left out,
    and the 1/N stays. By hand (the layer above, no normalisation, Eq. 2's sum): part 0 gives 4,
    part 1 gives 8 on the proj layer; on the second layer (the student shifted by 1 on each valid
    element: 4 per part) part 1 has no teacher, leaving (1/2)·4 = 2."""
    s, t, mask = _hand_layer()
    present = [[True, True], [True, False]]  # teacher 1 gives proj and not enc1
    total, parts = sa_loss([s, t + 1], [t, t], mask, num_parts=2, normalize=False, reduction="sum", present=present)
    assert parts["sa_proj"].item() == pytest.approx(6.0) and parts["sa_enc1"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(8.0)
    # whatever the absent target holds, and with normalisation too, it changes nothing
    noise = t.clone()
    noise[:, 1] = torch.randn_like(noise[:, 1]) * 100
    for normalize in (False, True):
        a = sa_loss([s, t + 1], [t, t], mask, num_parts=2, normalize=normalize, present=present)[0]
        b = sa_loss([s, t + 1], [t, noise], mask, num_parts=2, normalize=normalize, present=present)[0]
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # no gradient reaches the student's part without a teacher
    x = s.clone().requires_grad_(True)
    sa_loss([s, x], [t, noise], mask, num_parts=2, present=present)[0].backward()
    assert bool((x.grad[:, 1] == 0).all()) and bool((x.grad[:, 0, :2] != 0).any())
    # all present is the plain loss; a wrong shape or a compressed student is refused
    assert sa_loss([s], [t], mask, num_parts=2, present=[[True], [True]])[0].item() == pytest.approx(
        sa_loss([s], [t], mask, num_parts=2)[0].item())
    with pytest.raises(ValueError, match="present has shape"):
        sa_loss([s], [t], mask, num_parts=2, present=[[True, False]])
    with pytest.raises(ValueError, match="extended student"):
        sa_loss([s[:, 0]], [t], mask, num_parts=2, present=[[True], [False]], index=torch.zeros(1, 3, dtype=torch.long))


def test_sa_loss_standardises_each_part_with_its_teachers_statistics():
    # d = 1, n = 2, no padding. Teacher part 0 = [1, 3]: mean 2, var 1 → std √(1 + 1e-5);
    # student part 0 = [2, 2] → (0, 0), teacher → (∓1/std) → squared sum 2/(1 + 1e-5).
    # Teacher part 1 = [0, 0]: mean 0, std √1e-5; student [0, 0.001] → (0, 0.001/√1e-5) → 0.1.
    # Loss = (1/N)·(2/(1+1e-5) + 0.1) / V with N = 2, V = 2.
    s = torch.tensor([[[[2.0], [2.0]], [[0.0], [0.001]]]])
    t = torch.tensor([[[[1.0], [3.0]], [[0.0], [0.0]]]])
    total, _ = sa_loss([s], [t], None, num_parts=2, stats="teacher")
    expected = (2 / (1 + 1e-5) + 0.1) / 2 / 2
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_sa_loss_standardises_every_sequence_by_its_own_statistics():
    # The paper's rule (stats="own", the default): d = 1, n = 2, no padding, N = 2, V = 2.
    # Part 0: student [2, 4] → mean 3, var 1 → (∓1/√(1+ε)); teacher [1, 3] → the same values → 0.
    # Part 1: student [0, 1] → mean .5, var .25 → (∓.5/√(.25+ε)); teacher [5, 3] → mean 4, var 1 →
    # (±1/√(1+ε)): each difference is a + b with a = .5/√(.25+ε), b = 1/√(1+ε), squared twice.
    s = torch.tensor([[[[2.0], [4.0]], [[0.0], [1.0]]]])
    t = torch.tensor([[[[1.0], [3.0]], [[5.0], [3.0]]]])
    a, b = 0.5 / math.sqrt(0.25 + 1e-5), 1 / math.sqrt(1 + 1e-5)
    expected = (2 * (a + b) ** 2) / 2 / 2
    total, parts = sa_loss([s], [t], None, num_parts=2)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # the teacher's map instead: part 0 differs by 1 per token (σ_t = 1) → 2/(1+ε); part 1 by
    # (5, 2)/1 → 29/(1+ε)
    teacher = sa_loss([s], [t], None, num_parts=2, stats="teacher")[0]
    assert teacher.item() == pytest.approx((2 + 29) / (1 + 1e-5) / 2 / 2, rel=1e-5)
    # own statistics ignore each side's per-channel scale and offset
    shifted = sa_loss([3 * s + 7], [t], None, num_parts=2)[0]
    assert shifted.item() == pytest.approx(total.item(), rel=1e-4)
    with pytest.raises(ValueError, match="stats"):
        sa_loss([s], [t], None, num_parts=2, stats="student")


def test_sa_loss_is_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    t = 3 * torch.randn(2, 3, 5, 4, generator=g) + 1
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    total, _ = sa_loss([t.clone(), t.clone()], [t, t], mask, num_parts=3)
    assert total.item() == 0.0
    idx = torch.randint(3, (2, 5), generator=g)
    kept = t.gather(1, idx[:, None, :, None].expand(-1, 1, -1, 4)).squeeze(1)
    assert sa_loss([kept], [t], mask, 3, index=idx)[0].item() == 0.0
    assert sa_loss([kept], [kept.clone()], mask, 3)[0].item() == 0.0


def test_sa_loss_ignores_padding_tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 2, 6, 3, generator=g)
    t = torch.randn(2, 2, 6, 3, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 2:] = True
    s2, t2 = s.clone(), t.clone()
    s2[:, :, 4:][0] = 1e4
    t2[1, :, 2:] = -3e3
    for normalize in (True, False):
        a = sa_loss([s], [t], mask, 2, normalize=normalize)[0]
        b = sa_loss([s2], [t2], mask, 2, normalize=normalize)[0]
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    s2.requires_grad_(True)
    sa_loss([s2], [t2], mask, 2)[0].backward()
    assert (s2.grad[0, :, 4:] == 0).all() and (s2.grad[1, :, 2:] == 0).all()
    assert s2.grad[0, :, :4].abs().sum() > 0


def test_compressed_sa_loss_is_the_extended_loss_on_the_kept_tokens():
    g = torch.Generator().manual_seed(2)
    b, num_parts, n, d = 2, 3, 7, 4
    s = torch.randn(b, num_parts, n, d, generator=g)
    t = 2 * torch.randn(b, num_parts, n, d, generator=g) - 1
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, 5:] = True
    idx = torch.randint(num_parts, (b, n), generator=g)
    kept = s.gather(1, idx[:, None, :, None].expand(-1, 1, -1, d)).squeeze(1)
    got = sa_loss([kept], [t], mask, num_parts, index=idx, stats="teacher", reduction="token")[0]
    # second path: standardise every part with its own teacher statistics, pick the kept tokens
    total = 0.0
    for k in range(num_parts):
        stats = channel_stats(t[:, k], mask)
        diff = ((standardize(s[:, k], stats=stats) - standardize(t[:, k], stats=stats)) ** 2).sum(-1)
        total += diff[(idx == k) & ~mask].sum()
    expected = total / num_parts / (~mask).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # own statistics: the kept teacher tokens are one target sequence, each side by its own
    own = sa_loss([kept], [t], mask, num_parts, index=idx, reduction="token")[0]
    t_kept = t.gather(1, idx[:, None, :, None].expand(-1, 1, -1, d)).squeeze(1)
    diff = ((standardize(kept, mask) - standardize(t_kept, mask)) ** 2).sum(-1)[~mask].sum()
    assert own.item() == pytest.approx((diff / num_parts / (~mask).sum()).item(), rel=1e-5)
    # all positions from part 0, and part 1/2 of the extended student equal to the teacher:
    # the extended loss has only part 0's terms, which are the compressed loss's terms.
    zeros = torch.zeros(b, n, dtype=torch.long)
    ext = t.clone()
    ext[:, 0] = s[:, 0]
    a = sa_loss([s[:, 0]], [t], mask, num_parts, index=zeros, stats="teacher")[0]
    e = sa_loss([ext], [t], mask, num_parts, stats="teacher")[0]
    assert a.item() == pytest.approx(e.item(), rel=1e-6)


def test_sag_with_one_teacher_and_identity_equals_sa():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 4, generator=g)
    t = torch.randn(2, 1, 5, 4, generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    proj = SAGProjection(1, 4, 1, init="identity")
    for stats in ("own", "teacher"):
        a = sag_loss([s], [t], mask, proj, stats=stats)[0]
        b = sa_loss([s], [t[:, 0]], mask, num_parts=1, stats=stats)[0]
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_sag_projection_starts_random_unless_identity_is_asked():
    torch.manual_seed(0)
    d = 16
    w = SAGProjection(2, d, 3).weight.detach()
    assert w.shape == (3, 2, d, d)
    assert w.abs().max() <= 1 / math.sqrt(d)  # a linear layer's default range
    assert not torch.allclose(w[0, 0], torch.eye(d), atol=0.5)  # not near the identity
    assert not torch.equal(w[0, 0], w[0, 1]) and not torch.equal(w[0, 0], w[1, 0])
    assert torch.equal(SAGProjection(2, d, 3, init="identity").weight[1, 1], torch.eye(d))


def test_sag_projection_is_trained():
    g = torch.Generator().manual_seed(4)
    b, num_parts, n, d = 4, 2, 8, 4
    t = torch.randn(b, num_parts, n, d, generator=g)
    a0, a1 = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    student = t[:, 0] @ a0 + t[:, 1] @ a1  # reachable: W_a^0 = 2·a0, W_a^1 = 2·a1
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[2, 6:] = True
    proj = SAGProjection(num_parts, d, 2)
    s_layers = [student, student.clone()]
    t_layers = [t, t.clone()]
    loss, parts = sag_loss(s_layers, t_layers, mask, proj)
    assert list(parts) == ["sag_proj", "sag_enc1"]
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(proj.parameters(), lr=0.05)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = sag_loss(s_layers, t_layers, mask, proj)[0]
        loss.backward()
        opt.step()
    last = sag_loss(s_layers, t_layers, mask, proj)[0].item()
    assert last < 0.5 * first


# ----------------------------------------------------------------------------- TA
#
# Student label space C = 5. Teacher 1 has 2 classes → student classes [0, 3]; teacher 2 has
# 3 classes → student classes [1, 2, 4]. Logits are log-probabilities, so softmax gives them back.

C = 5
IDX1, IDX2 = [0, 3], [1, 2, 4]
P1 = [[0.7, 0.1, 0.2], [0.05, 0.05, 0.9]]  # conf 0.7, 0.05
P2 = [[0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25], [0.02, 0.03, 0.01, 0.94]]  # conf 0.6, 0.25, 0.03
B1 = [[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]]
B2 = [[0.5, 0.5, 0.2, 0.2], [0.2, 0.8, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]
PS = [[0.05, 0.1, 0.5, 0.05, 0.1, 0.2], [0.6, 0.05, 0.05, 0.1, 0.05, 0.15]]  # student query 0, 1
BS = [[0.6, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]


def _teachers():
    logits = [torch.tensor([P1]).log(), torch.tensor([P2]).log()]
    boxes = [torch.tensor([B1]), torch.tensor([B2])]
    return logits, boxes, [torch.tensor(IDX1), torch.tensor(IDX2)]


def _student(requires_grad=False):
    out = {"pred_logits": torch.tensor([PS]).log(), "pred_boxes": torch.tensor([BS])}
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def test_pad_teacher_probs_exact_vectors():
    logits, _, idx = _teachers()
    p1 = pad_teacher_probs(logits[0], idx[0], C)
    p2 = pad_teacher_probs(logits[1], idx[1], C)
    assert p1.shape == (1, 2, 6) and p2.shape == (1, 3, 6)
    assert torch.allclose(p1[0, 0], torch.tensor([0.7, 0, 0, 0.1, 0, 0.2]), atol=1e-6)
    assert torch.allclose(p2[0, 0], torch.tensor([0, 0.1, 0.6, 0, 0.1, 0.2]), atol=1e-6)
    assert torch.allclose(p2[0, 2], torch.tensor([0, 0.02, 0.03, 0, 0.01, 0.94]), atol=1e-6)
    # temperature: tempering the padded distribution equals padding the tempered softmax
    assert torch.allclose(temper(p2, 2.0), pad_teacher_probs(logits[1], idx[1], C, temperature=2.0), atol=1e-6)
    with pytest.raises(ValueError):
        pad_teacher_probs(logits[0], [0, 0], C)
    with pytest.raises(ValueError):
        pad_teacher_probs(logits[0], [0, 5], C)
    with pytest.raises(ValueError):
        pad_teacher_probs(logits[0], [0, 1, 2], C)


def test_pool_teachers_filters_and_keeps_top_k():
    logits, boxes, idx = _teachers()
    padded = [(pad_teacher_probs(l, i, C), b) for l, b, i in zip(logits, boxes, idx)]
    (pooled,) = pool_teachers(padded, threshold=0.1)
    # conf: T1 0.7, 0.05; T2 0.6, 0.25, 0.03 → 0.05 and 0.03 dropped; sorted 0.7, 0.6, 0.25
    assert torch.allclose(pooled["conf"], torch.tensor([0.7, 0.6, 0.25]), atol=1e-6)
    assert pooled["teacher"].tolist() == [0, 1, 1] and pooled["query"].tolist() == [0, 0, 1]
    assert torch.allclose(pooled["boxes"], torch.tensor([B1[0], B2[0], B2[1]]))
    (top2,) = pool_teachers(padded, threshold=0.1, topk=2)
    assert top2["teacher"].tolist() == [0, 1] and top2["query"].tolist() == [0, 0]
    (everything,) = pool_teachers(padded, threshold=0.0)
    assert everything["conf"].shape == (5,)


def _giou(a, b):
    """GIoU of two cxcywh boxes, plain Python."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_ta_matching_and_loss_by_hand():
    logits, boxes, idx = _teachers()
    crit = TaskAmalgamationLoss(C, threshold=0.1)
    targets = crit.prepare_targets(logits, boxes, idx)
    (src, tgt), = crit.match(_student(), targets)
    # targets: 0 = T1 q0 ([.7,0,0,.1,0,.2], box (.3,.3,.2,.2)), 1 = T2 q0, 2 = T2 q1.
    # Brute force over all injective maps of the 2 queries with cost KL + 5·L1 + 2·(1−GIoU) − conf.
    tp = [[0.7, 0, 0, 0.1, 0, 0.2], [0, 0.1, 0.6, 0, 0.1, 0.2], [0, 0.25, 0.25, 0, 0.25, 0.25]]
    tb, tc = [B1[0], B2[0], B2[1]], [0.7, 0.6, 0.25]

    def cost(i, j):
        l1 = sum(abs(x - y) for x, y in zip(BS[i], tb[j]))
        return _kl(tp[j], PS[i]) + 5 * l1 + 2 * (1 - _giou(BS[i], tb[j])) - tc[j]

    best = min(itertools.permutations(range(3), 2), key=lambda js: cost(0, js[0]) + cost(1, js[1]))
    assert best == (1, 0)
    assert dict(zip(src.tolist(), tgt.tolist())) == {0: 1, 1: 0}

    losses = crit(_student(), logits, boxes, idx)
    # pair (q1, T1 q0), conf .7: KL = .7·ln(.7/.6) + .1·ln(.1/.1) + .2·ln(.2/.15) ≈ 0.165442;
    #   identical boxes → L1 = 0, 1 − GIoU = 0.
    # pair (q0, T2 q0), conf .6: KL = .6·ln(.6/.5) ≈ 0.109393 (the .1, .1, .2 entries match);
    #   boxes (.6,.5,.2,.2) vs (.5,.5,.2,.2): L1 = .1; xyxy [.5,.7]×[.4,.6] vs [.4,.6]×[.4,.6]:
    #   inter .02, union .06, hull .06 → GIoU = 1/3, 1 − GIoU = 2/3.
    # Two matched pairs: kl = (.7·.165442 + .6·.109393)/2 ≈ 0.090723, l1 = (.6·.1)/2 = .03,
    # giou = (.6·2/3)/2 = .2, total = 1·kl + 5·.03 + 2·.2 ≈ 0.640723.
    kl_a = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.15)
    kl_b = 0.6 * math.log(0.6 / 0.5)
    kl = (0.7 * kl_a + 0.6 * kl_b) / 2
    assert kl == pytest.approx(0.090723, abs=1e-6)
    assert losses["loss_ta_kl"].item() == pytest.approx(kl, rel=1e-5)
    assert losses["loss_ta_l1"].item() == pytest.approx(0.03, rel=1e-5)
    assert losses["loss_ta_giou"].item() == pytest.approx(0.2, rel=1e-5)
    assert losses["total"].item() == pytest.approx(kl + 0.15 + 0.4, rel=1e-5)


def test_ta_aux_outputs_add_suffixed_terms():
    logits, boxes, idx = _teachers()
    crit = TaskAmalgamationLoss(C, threshold=0.1)
    single = crit(_student(), logits, boxes, idx)
    out = _student()
    out["aux_outputs"] = [_student()]
    both = crit(out, logits, boxes, idx)
    for key in ("loss_ta_kl", "loss_ta_l1", "loss_ta_giou"):
        assert both[f"{key}_0"].item() == pytest.approx(single[key].item())
    assert both["total"].item() == pytest.approx(2 * single["total"].item())


def test_ta_unmatched_queries_get_no_loss_and_no_targets_gives_zero():
    logits, boxes, idx = _teachers()
    out = _student(requires_grad=True)
    crit = TaskAmalgamationLoss(C, threshold=0.1, topk=1)  # one target (T1 q0) → one pair
    losses = crit(out, logits, boxes, idx)
    losses["total"].backward()
    g = out["pred_logits"].grad[0]
    assert g[1].abs().sum() > 0 and (g[0] == 0).all()  # query 1 is matched to T1 q0
    # one pair, conf .7, KL as above, identical boxes
    kl_a = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.15)
    assert losses["loss_ta_kl"].item() == pytest.approx(0.7 * kl_a, rel=1e-5)
    empty = TaskAmalgamationLoss(C, threshold=0.99)(_student(requires_grad=True), logits, boxes, idx)
    assert empty["total"].item() == 0.0
    empty["total"].backward()


def test_ta_sends_unmatched_queries_to_no_object():
    # threshold .65 keeps only T1 q0 (probs [.7, 0, 0, .1, 0, .2], box B1[0]). Student q1 has the
    # same box and KL .7·ln(.7/.6) + .2·ln(.2/.15) ≈ 0.165, q0 a KL of 1.917 and another box: q1 is
    # matched, q0 is not → loss_ta_noobj = −ln p̂_0(no object) = −ln .2 over 1 pair.
    logits, boxes, idx = _teachers()
    off = TaskAmalgamationLoss(C, threshold=0.65)(_student(), logits, boxes, idx)
    out = _student(requires_grad=True)
    on = TaskAmalgamationLoss(C, threshold=0.65, noobj_weight=0.1)(out, logits, boxes, idx)
    assert "loss_ta_noobj" not in off
    assert on["loss_ta_noobj"].item() == pytest.approx(-math.log(0.2), rel=1e-5)
    assert on["loss_ta_kl"].item() == pytest.approx(off["loss_ta_kl"].item())
    assert on["total"].item() == pytest.approx(off["total"].item() - 0.1 * math.log(0.2), rel=1e-5)
    on["loss_ta_noobj"].backward()
    grad = out["pred_logits"].grad[0]
    assert grad[1].abs().sum() == 0 and grad[0, -1] < 0  # only the unmatched query, towards no object
    # no teacher prediction passes (the label-free case on an empty image): every query is
    # unmatched, and the pair count is clamped to 1 → −ln .2 − ln .15
    none = TaskAmalgamationLoss(C, threshold=0.99, noobj_weight=1.0)(_student(), logits, boxes, idx)
    assert none["loss_ta_noobj"].item() == pytest.approx(-math.log(0.2) - math.log(0.15), rel=1e-5)
    assert none["total"].item() == pytest.approx(none["loss_ta_noobj"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="noobj_weight"):
        TaskAmalgamationLoss(C, noobj_weight=float("nan"))


def test_ta_refuses_mismatched_inputs():
    logits, boxes, idx = _teachers()
    crit = TaskAmalgamationLoss(C)
    with pytest.raises(ValueError):
        crit(_student(), logits, boxes, idx[:1])
    with pytest.raises(ValueError):
        TaskAmalgamationLoss(4)(_student(), logits, boxes, idx)


def test_ta_confidence_term_steers_the_matching():
    # One student query (PS[0]); matching cost with α = (1, 0, 0): KL − α3·conf.
    # KL(T1 q0 ‖ PS[0]) = .7·ln(.7/.05) + .1·ln(.1/.05) + .2·ln(.2/.2) ≈ 1.9167, conf .7;
    # KL(T2 q0 ‖ PS[0]) = .6·ln(.6/.5) ≈ 0.1094, conf .6.
    # α3 = 0: T2 q0 (0.109 < 1.917). α3 = 30: T1 q0 (1.917 − 21 = −19.08 < 0.109 − 18 = −17.89).
    logits, boxes, idx = _teachers()
    out = {"pred_logits": torch.tensor([PS[:1]]).log(), "pred_boxes": torch.tensor([BS[:1]])}
    for alpha_conf, expected in ((0.0, 1), (30.0, 0)):
        crit = TaskAmalgamationLoss(C, alpha=(1.0, 0.0, 0.0), alpha_conf=alpha_conf, threshold=0.1)
        (src, tgt), = crit.match(out, crit.prepare_targets(logits, boxes, idx))
        assert src.tolist() == [0] and tgt.tolist() == [expected]


def test_element_reduction_is_the_token_reduction_over_d():
    """The default in amalgamate: a mean over valid elements, so SA does not scale with d."""
    from kacli.amalgamation.config import SAConfig
    from kacli.losses.sequence import sa_loss

    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 2, 5, 8, generator=g) for _ in range(2)]
    t = [torch.randn(2, 2, 5, 8, generator=g) for _ in range(2)]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    tok, _ = sa_loss(s, t, mask, num_parts=2, reduction="token")
    ele, parts = sa_loss(s, t, mask, num_parts=2, reduction="element")
    assert ele.item() == pytest.approx(tok.item() / 8, rel=1e-6)
    assert SAConfig().reduction == "element"


def test_batched_matching_of_all_heads_equals_matching_each_image_alone():
    """match_heads builds one cost matrix for every decoder output and image of the batch; each
    image's assignment must be the one it gets when matched alone (whose optimality the
    hand-built cases above check by enumeration), images without targets included."""
    g = torch.Generator().manual_seed(3)
    C, B, Q = 5, 3, 4
    crit = TaskAmalgamationLoss(C, threshold=0.3)
    logits = [torch.randn(B, 6, 3, generator=g) * 3, torch.randn(B, 5, 4, generator=g) * 3]
    boxes = [torch.rand(B, 6, 4, generator=g) * 0.5 + 0.25, torch.rand(B, 5, 4, generator=g) * 0.5 + 0.25]
    logits[0][2] = -10.0  # image 2: no confident target from teacher 0
    logits[1][2] = -10.0
    logits[0][2, :, -1] = 10.0
    logits[1][2, :, -1] = 10.0
    idx = [torch.tensor([0, 2]), torch.tensor([1, 3, 4])]
    targets = crit.prepare_targets(logits, boxes, idx)
    assert targets[2]["conf"].numel() == 0 and targets[0]["conf"].numel() > 0
    heads = [{"pred_logits": torch.randn(B, Q, C + 1, generator=g),
              "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25} for _ in range(3)]
    batched = crit.match_heads(heads, targets)
    for h, head in enumerate(heads):
        for b in range(B):
            rows, cols = batched[h][b]
            m = targets[b]["conf"].numel()
            assert len(rows) == min(Q, m)
            if m == 0:
                continue
            one = {"pred_logits": head["pred_logits"][b:b + 1], "pred_boxes": head["pred_boxes"][b:b + 1]}
            r1, c1 = crit.match(one, [targets[b]])[0]
            assert torch.equal(rows, r1) and torch.equal(cols, c1)
