"""Sequence compression: token redundancy (Eq. 8), Algorithm 1 and the other selections."""

from __future__ import annotations

import pytest
import torch

from kacli.models.compress import flat_indices, gather_parts, redundancy, select_parts


def _explicit_redundancy(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 8 as written: row means of S = X̂X̂ᵀ over the valid columns, for one image (n, d)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    s = unit @ unit.T
    valid = ~mask
    return s[:, valid].mean(dim=1)


def _algorithm1(seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 line by line for one image: seqs (N, n, d), mask (n,)."""
    num_parts, n, _ = seqs.shape
    concat = seqs.reshape(num_parts * n, -1)
    r_all = _explicit_redundancy(concat, mask.repeat(num_parts))
    keep = []
    for i in range(n):
        t_keep, r_min = 0, float("inf")
        for t in range(num_parts):
            r = r_all[t * n + i].item()
            if r < r_min:
                t_keep, r_min = t, r
        keep.append(t_keep)
    return torch.tensor(keep)


def test_redundancy_hand_case_excludes_padding():
    # x1 = x2 = (1, 0), x3 = (0, 1); x4 = (5, 5) is padding.
    # cos: x1·x1 = 1, x1·x2 = 1, x1·x3 = 0 → R(x1) = (1 + 1 + 0)/3 = 2/3 = R(x2);
    # R(x3) = (0 + 0 + 1)/3 = 1/3. Had x4 counted, R(x1) would be (2 + 1/√2)/4 ≈ 0.677.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[False, False, False, True]])
    r = redundancy(x, mask)
    assert torch.allclose(r[0, :3], torch.tensor([2 / 3, 2 / 3, 1 / 3]), atol=1e-6)
    assert r[0, 3] == float("inf")
    # scaling a token does not change cosine similarity
    x2 = x.clone()
    x2[0, 0] *= 7.0
    assert torch.allclose(redundancy(x2, mask)[0, :3], r[0, :3], atol=1e-6)


def test_redundancy_equals_explicit_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 8, generator=g)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, 7:] = True
    mask[2, 4:] = True
    r = redundancy(x, mask)
    for b in range(3):
        valid = ~mask[b]
        assert torch.allclose(r[b, valid], _explicit_redundancy(x[b], mask[b])[valid], atol=1e-6)
        assert torch.isinf(r[b, mask[b]]).all()


def test_algorithm1_hand_case():
    # Part 0: a0 = (1, 0), a1 = (1, 0); part 1: b0 = (0, 1), b1 = (1, 0).
    # X_T holds 4 unit tokens whose mean is (3/4, 1/4), so R(a0) = R(a1) = R(b1) = 3/4, R(b0) = 1/4.
    # Position 0: part 1 (1/4 < 3/4). Position 1: tie 3/4 = 3/4 → the lowest part, 0.
    seqs = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    r = redundancy(seqs.reshape(1, 4, 2), mask.repeat(1, 2))
    assert torch.allclose(r, torch.tensor([[0.75, 0.75, 0.25, 0.75]]))
    idx = select_parts(seqs, mask, "redundancy")
    assert idx.tolist() == [[1, 0]]
    assert idx.dtype == torch.int64
    # i_keep (0-based t·n + i): position 0 → 1·2 + 0 = 2, position 1 → 0·2 + 1 = 1
    assert flat_indices(idx, 2).tolist() == [[2, 1]]


def test_algorithm1_matches_line_by_line_loop_with_padding():
    g = torch.Generator().manual_seed(1)
    seqs = torch.randn(2, 3, 9, 6, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    idx = select_parts(seqs, mask, "redundancy")
    for b in range(2):
        valid = ~mask[b]
        assert idx[b, valid].tolist() == _algorithm1(seqs[b], mask[b])[valid].tolist()
    assert (idx[1, 5:] == 0).all()


def test_padding_does_not_change_the_selection():
    g = torch.Generator().manual_seed(2)
    seqs = torch.randn(1, 2, 6, 4, generator=g)
    padded = torch.cat([seqs, 100 * torch.randn(1, 2, 3, 4, generator=g)], dim=2)
    mask = torch.tensor([[False] * 6 + [True] * 3])
    short = select_parts(seqs, None, "redundancy")
    long = select_parts(padded, mask, "redundancy")
    assert long[:, :6].tolist() == short.tolist()


def test_isometric_pattern():
    seqs = torch.zeros(2, 3, 7, 4)
    idx = select_parts(seqs, None, "isometric")
    assert idx.tolist() == [[0, 1, 2, 0, 1, 2, 0]] * 2


def test_random_is_deterministic_with_a_seeded_generator():
    seqs = torch.zeros(2, 3, 64, 4)
    a = select_parts(seqs, None, "random", torch.Generator().manual_seed(5))
    b = select_parts(seqs, None, "random", torch.Generator().manual_seed(5))
    c = select_parts(seqs, None, "random", torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 2 and set(a.unique().tolist()) == {0, 1, 2}


def test_none_and_unknown_methods_are_refused():
    seqs = torch.zeros(1, 2, 4, 3)
    with pytest.raises(ValueError, match="none"):
        select_parts(seqs, None, "none")
    with pytest.raises(ValueError, match="unknown"):
        select_parts(seqs, None, "bogus")


def test_gather_parts_equals_indexing_the_concatenated_sequence():
    g = torch.Generator().manual_seed(3)
    b, num_parts, n, d = 2, 3, 5, 4
    x = torch.randn(b, num_parts, n, d, generator=g, requires_grad=True)
    idx = torch.randint(num_parts, (b, n), generator=g)
    kept = gather_parts(x, idx)
    concat = x.reshape(b, num_parts * n, d)
    flat = flat_indices(idx, n)
    via_concat = concat.gather(1, flat[..., None].expand(-1, -1, d))
    assert torch.equal(kept, via_concat)
    for bi in range(b):
        for i in range(n):
            assert torch.equal(kept[bi, i], x[bi, idx[bi, i], i])
    kept.sum().backward()
    # each position's kept token gets gradient 1, the others 0
    assert x.grad.sum().item() == pytest.approx(b * n * d)
