"""The extended student: decoupled encoder, N = 1 equals DETR, compression, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from kacli.errors import KacliError
from kacli.eval.flops import gflops
from kacli.models.checkpoint import build_model
from kacli.models.compress import gather_parts, select_parts
from kacli.models.config import model_config
from kacli.models.detr import DETR
from kacli.models.student import Student, block_diagonal_mask


def _cfg(**kw):
    base = {"preset": "tiny", "tiny_widths": [8, 8, 16, 16], "d_model": 32, "nheads": 4, "enc_layers": 2,
            "dec_layers": 2, "dim_feedforward": 64, "num_queries": 5}
    base.update(kw)
    return model_config(base)


def _padded_batch():
    """Two images of different sizes in one batch: 64×96 and 48×64 (padded to 64×96)."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 96)
    mask = torch.ones(2, 64, 96, dtype=torch.bool)
    images[0] = torch.randn(3, 64, 96, generator=g)
    mask[0] = False
    images[1, :, :48, :64] = torch.randn(3, 48, 64, generator=g)
    mask[1, :48, :64] = False
    return images, mask


def _distinct_parts(model: Student, seed: int = 1) -> Student:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.input_projs:
            p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.2)
            p.bias.copy_(torch.randn(p.bias.shape, generator=g) * 0.1)
    return model


def test_block_diagonal_mask_hand_case():
    m = block_diagonal_mask(2, 2)
    assert m.tolist() == [[False, False, True, True], [False, False, True, True],
                          [True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize("num_parts", [2, 3])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_decoupled_encoder_equals_dense_masked_encoder_with_padding(num_parts, pre_norm):
    torch.manual_seed(0)
    model = _distinct_parts(Student(_cfg(pre_norm=pre_norm), 3, num_parts)).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        fast = model(images, mask)
        dense = model(images, mask, dense_oracle=True)
    assert fast["enc_proj"].shape == (2, num_parts, 4 * 6, 32)
    assert fast["enc_mask"][1].sum() == 4 * 6 - 3 * 4  # image 1 has a 3x4 valid grid in a 4x6 map
    for a, b in zip(fast["enc_layers"], dense["enc_layers"]):
        assert a.shape == (2, num_parts, 24, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast["pred_logits"], dense["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast["pred_boxes"], dense["pred_boxes"], atol=1e-5, rtol=0)
    # the parts really differ, so the equality is not between copies
    assert (fast["enc_layers"][-1][:, 0] - fast["enc_layers"][-1][:, 1]).abs().max() > 1e-2


def test_part_k_equals_a_detr_with_projection_k():
    """Part k of the decoupled encoder is the encoder of a DETR whose input projection is
    projection k (same backbone, same transformer): no information flows between parts."""
    torch.manual_seed(0)
    student = _distinct_parts(Student(_cfg(), 3, 3)).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        out = student(images, mask)
        for k in range(3):
            detr = DETR(_cfg(), 3).eval()
            sd = {key: v for key, v in student.state_dict().items() if not key.startswith("input_projs.")}
            sd.update({f"input_proj.{n}": v for n, v in student.input_projs[k].state_dict().items()})
            detr.load_state_dict(sd)
            ref = detr(images, mask)
            torch.testing.assert_close(out["enc_proj"][:, k], ref["enc_proj"], atol=1e-6, rtol=0)
            for a, b in zip(out["enc_layers"], ref["enc_layers"]):
                torch.testing.assert_close(a[:, k], b, atol=1e-5, rtol=0)


def test_single_part_student_is_plain_detr():
    torch.manual_seed(0)
    detr = DETR(_cfg(), 4).eval()
    student = Student(_cfg(), 4, 1).eval()
    sd = {k.replace("input_proj.", "input_projs.0."): v for k, v in detr.state_dict().items()}
    student.load_state_dict(sd)
    images, mask = _padded_batch()
    with torch.no_grad():
        a, b = detr(images, mask), student(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert torch.equal(a["enc_layers"][-1], b["enc_layers"][-1][:, 0])


def _raw_ext_steps(student: Student, steps: int = 3) -> Student:
    """A few SGD steps of the raw-ext objective (ground truth only, nothing part-specific)."""
    from kacli.losses.criterion import SetCriterion
    from kacli.losses.matcher import HungarianMatcher

    criterion = SetCriterion(3, HungarianMatcher())
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.6, 0.5, 0.3, 0.2], [0.2, 0.2, 0.1, 0.1]]), "labels": torch.tensor([0, 2])}]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    images, mask = _padded_batch()
    for _ in range(steps):
        opt.zero_grad()
        criterion(student.train()(images, mask), targets)["total"].backward()
        opt.step()
    return student


def test_projections_start_independent_and_stay_apart_without_sa():
    # Copies of one initialisation get the same input, gradient and update when nothing
    # part-specific supervises them (raw-ext): they stay equal and the student is raw DETR.
    torch.manual_seed(0)
    copies = Student(_cfg(), 3, 3, proj_init="copies")
    w = [p.weight for p in copies.input_projs]
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2]) and w[0].data_ptr() != w[1].data_ptr()
    _raw_ext_steps(copies)
    assert copies.input_projs[0].weight.grad.abs().sum() > 0
    assert torch.equal(copies.input_projs[0].weight, copies.input_projs[2].weight)
    # Independent initialisations (the default) differ from the start and after training steps.
    torch.manual_seed(0)
    s = Student(_cfg(), 3, 3)
    w = [p.weight.detach().clone() for p in s.input_projs]
    assert not torch.allclose(w[0], w[1], atol=1e-3) and not torch.allclose(w[1], w[2], atol=1e-3)
    # the same spread as DETR's own projection (a Conv2d's default initialisation)
    assert w[1].std().item() == pytest.approx(w[0].std().item(), rel=0.2)
    _raw_ext_steps(s)
    assert not torch.allclose(s.input_projs[0].weight, s.input_projs[1].weight, atol=1e-3)
    assert not torch.equal(s.input_projs[1].weight, w[1])  # and they train
    # part 0 is DETR's projection: with the same seed, everything but the extra parts is DETR's
    torch.manual_seed(0)
    detr = DETR(_cfg(), 3)
    torch.manual_seed(0)
    one = Student(_cfg(), 3, 2)
    assert torch.equal(one.input_projs[0].weight, detr.input_proj.weight)
    assert torch.equal(one.class_embed.weight, detr.class_embed.weight)
    assert not hasattr(one, "input_proj")
    with pytest.raises(KacliError, match="unknown projection initialisation"):
        Student(_cfg(), 3, 2, proj_init="zeros")


def test_each_part_trains_separately():
    torch.manual_seed(0)
    s = Student(_cfg(), 2, 3)
    out = s(*_padded_batch())
    out["enc_proj"][:, 1].sum().backward()  # only part 1's sequence
    assert s.input_projs[1].weight.grad.abs().sum() > 0
    assert s.input_projs[0].weight.grad is None or s.input_projs[0].weight.grad.abs().sum() == 0


def test_compressed_student_runs_encoder_on_n_tokens_and_costs_raw_detr_plus_projections():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    student = Student(cfg, 8, 2, compress="redundancy").eval()
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        out = student(images, mask)
    n = 4 * 4
    assert out["enc_proj"].shape == (1, n, 64) and out["part_idx"].shape == (1, n)
    assert all(y.shape == (1, n, 64) for y in out["enc_layers"])
    raw = gflops(DETR(cfg, 8), (images, mask))
    comp = gflops(student, (images, mask))
    # exactly one more 1x1 projection: C_backbone · d multiply-adds per token
    assert comp["macs"] - raw["macs"] == 128 * 64 * n
    assert abs(comp["gflops"] / raw["gflops"] - 1) < 0.02
    ext = gflops(Student(cfg, 8, 2), (images, mask))
    assert ext["gflops"] / raw["gflops"] > 1.3  # the uncompressed extension is much dearer


def test_compression_picks_parts_from_teachers_in_training_and_own_parts_in_eval():
    torch.manual_seed(0)
    model = _distinct_parts(Student(_cfg(), 3, 2, compress="redundancy"))
    images, mask = _padded_batch()
    n = 24
    teacher = torch.randn(2, 2, n, 32)
    out = model.train()(images, mask, teacher_proj=teacher)
    fmask = out["enc_mask"]
    expect = select_parts(teacher, fmask, "redundancy")
    assert torch.equal(out["part_idx"], expect)
    torch.testing.assert_close(out["enc_proj"], gather_parts(out["proj_parts"], expect))
    model.eval()
    with torch.no_grad():
        ev = model(images, mask)
    assert torch.equal(ev["part_idx"], select_parts(ev["proj_parts"], fmask, "redundancy"))
    # isometric: position i keeps part i mod N
    iso = Student(_cfg(), 3, 2, compress="isometric").eval()
    with torch.no_grad():
        assert iso(images, mask)["part_idx"][0].tolist() == [i % 2 for i in range(n)]


def test_random_compression_is_deterministic_at_evaluation():
    torch.manual_seed(0)
    model = Student(_cfg(), 3, 3, compress="random", seed=7).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        a = model(images, mask)["part_idx"]
        torch.rand(10)  # the global generator moves; evaluation must not depend on it
        b = model(images, mask)["part_idx"]
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0, 1, 2}
    other = Student(_cfg(), 3, 3, compress="random", seed=8).eval()
    with torch.no_grad():
        assert not torch.equal(other(images, mask)["part_idx"], a)


def test_bad_student_configurations():
    with pytest.raises(KacliError, match="needs at least 2 parts"):
        Student(_cfg(), 3, 1, compress="redundancy")
    with pytest.raises(KacliError, match="unknown compression"):
        Student(_cfg(), 3, 2, compress="sparse")
    with pytest.raises(KacliError, match="at least one part"):
        Student(_cfg(), 3, 0)
    with pytest.raises(KacliError, match="unknown student architecture key"):
        Student.from_arch({**_cfg().to_dict(), "num_parts": 2, "parts": 3}, 3)


def test_checkpoint_round_trip_builds_the_same_student():
    torch.manual_seed(0)
    s = _distinct_parts(Student(_cfg(), 3, 2, compress="isometric", seed=5)).eval()
    arch = s.arch_dict()
    assert (arch["num_parts"], arch["compress"], arch["seed"], arch["d_model"]) == (2, "isometric", 5, 32)
    ckpt = {"kind": "student", "arch": arch, "label_map": {"ids": [1, 2, 3], "names": ["a", "b", "c"]},
            "model": s.state_dict()}
    rebuilt = build_model(ckpt).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, mask)["pred_logits"], s(images, mask)["pred_logits"])
