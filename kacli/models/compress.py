"""Sequence compression for the extended student (Sec. III-B3, Algorithm 1, Eq. 8).

The extended student carries N parts of n tokens each (one per teacher). Compression keeps, for
every position ``i``, the ``i``-th token of exactly one part, so the encoder runs on n tokens.
A selection is an index tensor ``idx (B, n)`` with ``idx[b, i]`` = the part kept at position
``i``; :func:`gather_parts` applies it to any ``(B, N, n, d)`` tensor (the student's projected
sequence, every cached teacher layer), so student and teacher targets use the same tokens.

Methods (:data:`COMPRESSION_METHODS`):

- ``redundancy``: Algorithm 1. The redundancy of part t's token i is measured against the whole
  concatenated sequence X_T (all N parts' valid tokens); keep the least redundant part (ties go to
  the lowest part index).
- ``isometric``: part ``i mod N`` (tokens taken alternately from every part, Fig. 3a).
- ``random``: uniform parts drawn from a ``torch.Generator`` (pass a generator with a fixed seed
  at evaluation, so the result is deterministic).
- ``none``: no compression; not a selection, so :func:`select_parts` refuses it.

Padding masks are ``True`` at padding, as everywhere in kacli; all N parts share one mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COMPRESSION_METHODS = ("none", "redundancy", "isometric", "random")
SELECTIONS = ("redundancy", "isometric", "random")


def redundancy(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Token redundancy R(x_i | X) (Eq. 8), the mean cosine similarity to the valid tokens.

    ``R(x_i|X) = (1/m) Σ_j cos(x_i, x_j)`` where j runs over the m valid tokens of the same image
    (the paper's mean over the row of S = X̂X̂ᵀ, with padding left out of both the rows and the
    mean). Because ``Σ_j x̂_i·x̂_j = x̂_i·(Σ_j x̂_j)``, the row means are computed as a dot product
    with the mean unit vector: O(B·n·d) time and memory, no (B, n, n) matrix is formed.

    A zero token has cosine 0 with everything. Padding rows get ``+inf`` so that a padded token
    is never the least redundant; an image with no valid token gives ``+inf`` everywhere.

    Args:
        x: tokens ``(B, n, d)`` (any float dtype; computed in float32 or wider).
        mask: ``(B, n)`` bool, True at padding, or None (all valid).

    Returns:
        ``(B, n)`` float redundancy per token.
    """
    if x.dim() != 3:
        raise ValueError(f"redundancy expects (B, n, d) tokens, got shape {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    unit = F.normalize(x.to(dtype), dim=-1)
    if mask is None:
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
    unit = unit.masked_fill(mask.unsqueeze(-1), 0.0)
    count = (~mask).sum(dim=1, keepdim=True).clamp(min=1).to(dtype)  # (B, 1)
    mean_unit = unit.sum(dim=1, keepdim=True) / count.unsqueeze(-1)  # (B, 1, d)
    r = (unit * mean_unit).sum(dim=-1)  # (B, n)
    return r.masked_fill(mask, float("inf"))


def select_parts(
    seqs: Tensor,
    mask: Tensor | None,
    method: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """For every position, the part whose token is kept (Algorithm 1 and its variants).

    Args:
        seqs: the N parts ``(B, N, n, d)``: the teachers' projected sequences X_T at training,
            the student's own X_S at evaluation. Only the shape is used by ``isometric`` and
            ``random``.
        mask: ``(B, n)`` bool, True at padding (shared by all parts), or None.
        method: ``redundancy``, ``isometric`` or ``random``.
        generator: the random source for ``random`` (seeded → deterministic); None uses torch's
            global generator.

    Returns:
        ``idx (B, n)`` int64 in ``[0, N)``. For ``redundancy`` a padded position gets part 0
        (every part's token there is padding, so the choice carries no information).

    Raises:
        ValueError: ``none`` (not a selection) or an unknown method, or a malformed input.
    """
    if seqs.dim() != 4:
        raise ValueError(f"select_parts expects (B, N, n, d) parts, got shape {tuple(seqs.shape)}")
    b, num_parts, n, d = seqs.shape
    if method == "none":
        raise ValueError("compression method 'none' selects nothing; skip compression instead")
    if method == "redundancy":
        if mask is not None and mask.shape != (b, n):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match parts {(b, n)}")
        # R(x_t^i | X_T): every token against all N·m valid tokens of the concatenated sequence.
        flat_mask = None if mask is None else mask.repeat(1, num_parts)  # (B, N·n)
        r = redundancy(seqs.reshape(b, num_parts * n, d), flat_mask).view(b, num_parts, n)
        # argmin returns the first minimum: ties go to the lowest part index (Algorithm 1's "<").
        idx = r.argmin(dim=1)
        if mask is not None:
            idx = idx.masked_fill(mask, 0)
        return idx
    if method == "isometric":
        idx = torch.arange(n, device=seqs.device) % num_parts
        return idx.unsqueeze(0).expand(b, n).clone()
    if method == "random":
        device = generator.device if generator is not None else seqs.device
        idx = torch.randint(num_parts, (b, n), generator=generator, device=device)
        return idx.to(seqs.device)
    raise ValueError(f"unknown compression method {method!r}; expected one of {', '.join(SELECTIONS)}")


def gather_parts(x: Tensor, idx: Tensor) -> Tensor:
    """Keep part ``idx[b, i]``'s ``i``-th token: ``out[b, i] = x[b, idx[b, i], i]``.

    Args:
        x: ``(B, N, n, d)`` (differentiable).
        idx: ``(B, n)`` int64 in ``[0, N)`` from :func:`select_parts`.

    Returns:
        ``(B, n, d)``.
    """
    if x.dim() != 4 or idx.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"gather_parts: x {tuple(x.shape)} and idx {tuple(idx.shape)} do not fit")
    index = idx.to(device=x.device, dtype=torch.long)[:, None, :, None].expand(-1, 1, -1, x.shape[3])
    return x.gather(1, index).squeeze(1)


def flat_indices(idx: Tensor, n: int) -> Tensor:
    """Positions of the kept tokens in the concatenated ``(B, N·n)`` sequence (the paper's i_keep).

    ``flat[b, i] = idx[b, i]·n + i`` (0-based; Algorithm 1 writes ``(t_keep − 1)·n + i`` 1-based),
    so ``concat.gather(1, flat)`` equals :func:`gather_parts` on the unconcatenated parts.

    Args:
        idx: ``(B, n)`` part indices.
        n: tokens per part.

    Returns:
        ``(B, n)`` int64.
    """
    if idx.dim() != 2 or idx.shape[1] != n:
        raise ValueError(f"flat_indices: idx {tuple(idx.shape)} does not have n = {n} positions")
    return idx.long() * n + torch.arange(n, device=idx.device)
