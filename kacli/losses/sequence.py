"""Sequence-level supervision: the SA loss (Eq. 2) and the SAG baseline (Eq. 5).

Both compare student and teacher token sequences layer by layer (the projected input sequence,
then every encoder layer). Tokens at padding (mask ``True``) never enter a statistic or a sum.

Normalisation (Sec. IV-A2, "all the sequences are normalized independently for each channel ...
by channel mean and variance in a mini-batch"): every channel is standardised with a mean and
standard deviation over the valid tokens of the mini-batch. ``stats="own"`` (the paper's rule, the
default) standardises every sequence — each student part and each teacher part — by its own
statistics, so the loss compares shapes and ignores each side's scale and offset per channel.
``stats="teacher"`` applies the target's affine map to both sides: the loss is then exactly 0 only
when the student equals the target, and the student must also match its scale. Each teacher part
k has its own statistics either way (teachers are different networks).

Reduction: the squared differences are summed over channels and over tokens, then divided by the
number of valid token positions V of the batch (``Σ_b`` valid tokens of one part) and, with the
default ``reduction="element"``, by the width d too — a mean over valid elements, so the loss
grows neither with the image size nor with d and sits on the scale of DETR's losses (about 2 per
layer for unrelated standardised sequences, whatever d; docs/DEMO.md, "Design decisions").
``reduction="token"`` keeps the per-channel sum (d times the mean); ``reduction="sum"`` is Eq. 2's
plain Frobenius form. The 1/N of Eq. 2 is always applied, whether the student is extended (N·n
tokens) or compressed (n tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

EPS = 1e-5
REDUCTIONS = ("element", "token", "sum")
STATS = ("own", "teacher")
#: How :class:`SAGProjection` starts its W_a.
SAG_INITS = ("random", "identity")


def _valid(mask: Tensor | None, shape: torch.Size, device) -> Tensor:
    """``(…)`` bool, True at valid tokens, for tokens of leading shape ``shape``."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(shape)}")
    return ~mask.to(device=device, dtype=torch.bool)


def channel_stats(x: Tensor, mask: Tensor | None = None, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation over the valid tokens.

    Args:
        x: ``(B, n, d)`` or ``(M, d)`` tokens.
        mask: ``(B, n)`` / ``(M,)`` bool, True at padding, or None.
        eps: added to the (biased) variance before the square root, as in batch normalisation.

    Returns:
        ``mean (d,)``, ``std (d,)`` in float32 (or wider), differentiable w.r.t. ``x``.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    valid = _valid(mask, x.shape[:-1], x.device)
    flat = x.to(dtype).reshape(-1, x.shape[-1])
    w = valid.reshape(-1, 1).to(dtype)
    mean, std = masked_stats(flat * w, w, (0,), eps)
    return mean[0], std[0]


def standardize(
    x: Tensor,
    mask: Tensor | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
    eps: float = EPS,
) -> Tensor:
    """Per-channel standardisation with mini-batch statistics over valid tokens.

    Args:
        x: ``(B, n, d)`` or ``(M, d)``.
        mask: ``(B, n)`` / ``(M,)`` bool, True at padding, or None. Padding tokens are mapped too
            but never contribute to the statistics.
        stats: ``(mean (d,), std (d,))`` to use instead of ``x``'s own (e.g. the target's).
        eps: see :func:`channel_stats`.

    Returns:
        Tensor of ``x``'s shape, float32 (or wider).
    """
    mean, std = channel_stats(x, mask, eps) if stats is None else stats
    return (x.to(mean.dtype) - mean) / std


def _layer_names(prefix: str, count: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"{prefix}_proj"] + [f"{prefix}_enc{i}" for i in range(1, count)]
    names = list(names)
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} supervised layers")
    return names


def _sq_error(s: Tensor, t: Tensor, valid: Tensor) -> Tensor:
    """Σ over valid tokens and channels of (s − t)²; ``valid`` broadcasts over the token axes."""
    sq = ((s - t) ** 2).sum(dim=-1)
    return sq.masked_fill(~valid, 0.0).sum()


def _reduce(value: Tensor, valid: Tensor, d: int, reduction: str) -> Tensor:
    """A layer's squared error → the chosen reduction: ``sum`` as is, ``token`` per valid token
    position, ``element`` per valid token and channel."""
    if reduction in ("token", "element"):
        value = value / valid.sum().clamp(min=1).to(value.dtype)
    if reduction == "element":
        value = value / d
    return value


def sa_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor | None,
    num_parts: int,
    normalize: bool = True,
    names: Sequence[str] | None = None,
    index: Tensor | None = None,
    reduction: str = "element",
    eps: float = EPS,
    stats: str = "own",
    present: Tensor | Sequence[Sequence[bool]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-level amalgamation loss, Eq. 2: ``Σ_l (1/N) Σ_k ‖norm(Y_s^{k,l}) − norm(Y_t^{k,l})‖²``.

    Each list entry is one supervised layer (the projection output, then each encoder layer).
    Three layouts per layer:

    - extended: student and teacher ``(B, N, n, d)``; teacher part k is standardised with its own
      statistics, student part k with its own (``stats="own"``) or teacher k's.
    - compressed, full teacher: student ``(B, n, d)``, teacher ``(B, N, n, d)`` and ``index (B, n)``
      (from ``kacli.models.compress.select_parts``): the teacher is gathered with ``index``. With
      ``stats="own"`` the kept teacher tokens are one target sequence and both sides are
      standardised by their own statistics (as the gathered layout); with ``teacher`` each kept
      token, student and teacher, by the statistics of the teacher part it was taken from, computed
      over that part's whole sequence (the extended loss restricted to the kept tokens).
    - compressed, gathered teacher: both ``(B, n, d)``; the gathered teacher sequence by its own
      statistics, the student by its own or the teacher's.

    Args:
        student, teacher: equal-length lists of tensors as above (teacher carries no gradient).
        mask: ``(B, n)`` bool, True at padding (shared by all parts), or None.
        num_parts: N, the number of teachers (Eq. 2's 1/N).
        normalize: standardise (see the module docstring); False compares raw values.
        names: one logging name per layer; default ``sa_proj, sa_enc1, sa_enc2, …``.
        index: ``(B, n)`` part indices for the "compressed, full teacher" layout.
        reduction: ``element`` divides each layer's squared Frobenius norm by V·d (V the number of
            valid token positions of the batch); ``token`` by V; ``sum`` is Eq. 2 verbatim.
        eps: standardisation epsilon.
        stats: ``own`` or ``teacher`` (see the module docstring).
        present: ``(N, L)`` bool, whether teacher k gives layer l (None: all do). A term ``(k, l)``
            whose teacher has no such layer (an RT-DETR hybrid encoder gives the last layer
            only) is left out of the sum, not imitated; the 1/N stays, so every other term
            weighs what it weighs with complete teachers. Extended layout only.

    Returns:
        ``(total, {name: layer value})``; all float32 scalars carrying gradients.
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student layers but {len(teacher)} teacher layers")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    if num_parts < 1:
        raise ValueError(f"num_parts must be positive, got {num_parts}")
    layer_names = _layer_names("sa", len(student), names)
    if not layer_names:
        raise ValueError("sa_loss needs at least one layer")
    # Layers of one layout are stacked and standardised together (one set of operations for all
    # of them instead of one per layer); statistics stay per layer, part and channel.
    groups: dict[str, list[int]] = {}
    for i, (name, s, t) in enumerate(zip(layer_names, student, teacher)):
        groups.setdefault(_layout(name, s, t, num_parts, index), []).append(i)
    keep = None
    if present is not None:
        if not isinstance(present, Tensor):  # a host-side list: all present is the plain loss
            present = None if all(all(row) for row in present) else torch.tensor(present, dtype=torch.bool)
        if present is not None:  # a tensor is taken as it is (no device sync per step)
            keep = present.to(device=student[0].device, dtype=torch.bool)
            if tuple(keep.shape) != (num_parts, len(layer_names)):
                raise ValueError(f"present has shape {tuple(keep.shape)}, expected (N={num_parts}, L={len(layer_names)})")
            if set(groups) != {"extended"}:
                raise ValueError("teachers that give only some layers (present) need the extended student")
    frobs: dict[int, Tensor] = {}
    for layout, idxs in groups.items():
        s_dim = 2 if layout == "extended" else 1
        t_dim = 1 if layout == "gathered" else 2
        s = torch.stack([student[i] for i in idxs], dim=s_dim).float()
        t = torch.stack([teacher[i] for i in idxs], dim=t_dim).detach().float()
        b, n = s.shape[0], s.shape[-2]
        valid = _valid(mask, torch.Size((b, n)), s.device)
        if keep is not None:  # per part and layer (N, L'), the absent terms left out
            err = _stacked_sq_error(layout, s, t, valid, index, normalize, eps, own=stats == "own", per_part=True)
            frob = (err * keep[:, idxs].to(err.dtype)).sum(0)
        else:
            frob = _stacked_sq_error(layout, s, t, valid, index, normalize, eps, own=stats == "own")  # (L,)
        frobs.update(zip(idxs, frob.unbind(0)))
    d = student[0].shape[-1]
    valid = _valid(mask, torch.Size((student[0].shape[0], student[0].shape[-2])), student[0].device)
    values = {name: _reduce(frobs[i] / num_parts, valid, d, reduction) for i, name in enumerate(layer_names)}
    total = torch.stack(list(values.values())).sum()
    return total, values


def _layout(name: str, s: Tensor, t: Tensor, num_parts: int, index: Tensor | None) -> str:
    """``extended``, ``compressed`` (full teacher + index) or ``gathered``; checks the shapes."""
    if s.dim() == 4:
        if t.shape != s.shape or s.shape[1] != num_parts:
            raise ValueError(f"{name}: extended student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                             f"must both be (B, N={num_parts}, n, d)")
        return "extended"
    if s.dim() == 3 and t.dim() == 4:
        if index is None:
            raise ValueError(f"{name}: a compressed student against full teacher parts needs index")
        if t.shape[1] != num_parts or t.shape[0] != s.shape[0] or t.shape[2:] != s.shape[1:]:
            raise ValueError(f"{name}: student {tuple(s.shape)} does not fit teacher {tuple(t.shape)}")
        return "compressed"
    if s.dim() == 3 and t.dim() == 3:
        if t.shape != s.shape:
            raise ValueError(f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ")
        return "gathered"
    raise ValueError(f"{name}: unsupported shapes student {tuple(s.shape)}, teacher {tuple(t.shape)}")


def _stacked_sq_error(layout: str, s: Tensor, t: Tensor, valid: Tensor, index: Tensor | None,
                      normalize: bool, eps: float, own: bool = True, per_part: bool = False) -> Tensor:
    """Per stacked layer, Σ over valid tokens (and parts) and channels of the squared error.

    Shapes by layout (L stacked layers): ``extended`` s, t ``(B, N, L, n, d)``; ``compressed`` s
    ``(B, L, n, d)``, t ``(B, N, L, n, d)``; ``gathered`` s, t ``(B, L, n, d)``. Returns ``(L,)``,
    or ``(N, L)`` with ``per_part`` (extended only: each part's sum apart).
    ``own``: the student is standardised by its own statistics, else by the teacher's.

    With the teacher's map on both sides the means cancel:
    ``(s − μ)/σ − (t − μ)/σ = (s − t)/σ``; only σ is applied.
    """
    w = valid.to(t.dtype)
    if layout in ("gathered", "extended"):
        if layout == "gathered":  # (B, L, n, d)
            wt, dims, layer_axis = w[:, None, :, None], (0, 2), 1
        else:  # (B, N, L, n, d)
            wt, dims, layer_axis = w[:, None, None, :, None], (0, 3), 2
        if not normalize:
            diff = (s - t) * wt
        elif own:
            mu_s, sd_s = masked_stats(s * wt, wt, dims, eps)
            mu_t, sd_t = masked_stats(t * wt, wt, dims, eps)
            diff = ((s - mu_s) / sd_s - (t - mu_t) / sd_t) * wt
        else:
            diff = (s - t) * wt / masked_stats(t * wt, wt, dims, eps)[1]
        axes = (1, layer_axis) if per_part and layout == "extended" else (layer_axis,)
        return diff.square().sum(dim=tuple(i for i in range(diff.dim()) if i not in axes))
    # compressed: teacher k's statistics over its whole sequence; each kept teacher token
    # standardised with the statistics of the part it was taken from
    B, N, L, n, d = t.shape
    idx = index.to(device=t.device, dtype=torch.long)
    kept = t.gather(1, idx[:, None, None, :, None].expand(B, 1, L, n, d)).squeeze(1)  # (B, L, n, d)
    if own or not normalize:
        # the kept teacher tokens form the target sequence, standardised by its own statistics
        return _stacked_sq_error("gathered", s, kept, valid, None, normalize, eps, own=True)
    w4, w5 = w[:, None, :, None], w[:, None, None, :, None]
    sd_t = masked_stats(t * w5, w5, (0, 3), eps)[1][0, :, :, 0]  # (N, L, d)
    diff = (s - kept) * w4 / sd_t[idx].transpose(1, 2)  # σ of each kept token's part, (B, L, n, d)
    return diff.square().sum(dim=(0, 2, 3))


def masked_stats(t: Tensor, w: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``t`` (zero at padding) over ``dims`` (the batch
    and token axes), weighted by the 0/1 token mask ``w`` (which broadcasts to ``t`` and varies only
    along ``dims``), kept as size-1 dimensions; biased variance plus ``eps`` under the square root,
    as in batch normalisation. The one implementation of the SA and SAG statistics
    (:func:`channel_stats` is it for one sequence)."""
    count = w.sum().clamp(min=1.0)  # valid tokens: the same for every part, layer and channel
    mean = t.sum(dim=dims, keepdim=True) / count
    var = ((t - mean) * w).square().sum(dim=dims, keepdim=True) / count
    return mean, torch.sqrt(var + eps)


class SAGProjection(nn.Module):
    """The common-space projections W_a^{k,l} of the SAG baseline (Eq. 5), one per teacher and layer.

    ``weight`` is ``(L, N, d, d)``. ``init="random"`` (default): the paper learns W_a "from
    scratch", so every matrix starts as a linear layer's default, entries uniform in
    ``[−1/√d, 1/√d]``; ``"identity"`` starts every W_a at I (teachers and student share d).
    These are trainable parameters: put the module's parameters in the optimiser.
    """

    def __init__(self, num_teachers: int, d: int, num_layers: int, init: str = "random"):
        super().__init__()
        if num_teachers < 1 or d < 1 or num_layers < 1:
            raise ValueError("SAGProjection needs positive num_teachers, d and num_layers")
        if init not in SAG_INITS:
            raise ValueError(f"init must be 'random' or 'identity', got {init!r}")
        self.num_teachers, self.d, self.num_layers = num_teachers, d, num_layers
        if init == "identity":
            weight = torch.eye(d).expand(num_layers, num_teachers, d, d).clone()
        else:
            bound = 1.0 / d**0.5
            weight = torch.empty(num_layers, num_teachers, d, d).uniform_(-bound, bound)
        self.weight = nn.Parameter(weight)

    def forward(self, teacher: Tensor, layer: int) -> Tensor:
        """Aggregated target ``Y_a = (1/N) Σ_k Y_t^k W_a^{k,layer}``.

        Args:
            teacher: ``(B, N, n, d)``.
            layer: which supervised layer's projections to use.

        Returns:
            ``(B, n, d)``.
        """
        if teacher.dim() != 4 or teacher.shape[1] != self.num_teachers or teacher.shape[3] != self.d:
            raise ValueError(f"SAG expects (B, N={self.num_teachers}, n, d={self.d}), got {tuple(teacher.shape)}")
        w = self.weight[layer]
        return torch.einsum("bknd,kde->bne", teacher.to(w.dtype), w) / self.num_teachers


def sag_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor | None,
    proj: SAGProjection,
    normalize: bool = True,
    names: Sequence[str] | None = None,
    reduction: str = "element",
    eps: float = EPS,
    stats: str = "own",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAG baseline, Eq. 5: ``Σ_l ‖norm(Y_s^l) − norm((1/N) Σ_k Y_t^{k,l} W_a^{k,l})‖²``.

    The student's single sequence is supervised by the projected mean of the teachers. The
    aggregated target is standardised with its own statistics (which depend on W_a, so W_a is
    trained through them too), the student with its own (``stats="own"``) or the target's; there
    is no extra 1/N beyond the one inside Y_a.

    Args:
        student: per layer ``(B, n, d)``.
        teacher: per layer ``(B, N, n, d)``.
        mask: ``(B, n)`` bool, True at padding, or None.
        proj: the :class:`SAGProjection` (one set of W_a per layer).
        normalize, reduction, eps, stats: as in :func:`sa_loss`.
        names: one logging name per layer; default ``sag_proj, sag_enc1, …``.

    Returns:
        ``(total, {name: layer value})``; gradients reach the student and ``proj.weight``.
    """
    if len(student) != len(teacher) or len(student) != proj.num_layers:
        raise ValueError(f"{len(student)} student layers, {len(teacher)} teacher layers, "
                         f"{proj.num_layers} SAG projections")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    layer_names = _layer_names("sag", len(student), names)
    values: dict[str, Tensor] = {}
    for layer, (name, s, t) in enumerate(zip(layer_names, student, teacher)):
        s = s.float()
        if s.dim() != 3 or t.dim() != 4 or t.shape[0] != s.shape[0] or t.shape[2:] != s.shape[1:]:
            raise ValueError(f"{name}: student {tuple(s.shape)} must be (B, n, d), "
                             f"teacher {tuple(t.shape)} (B, N, n, d)")
        valid = _valid(mask, s.shape[:2], s.device)
        t = t.detach().float().masked_fill(~valid[:, None, :, None], 0.0)
        s = s.masked_fill(~valid[..., None], 0.0)
        target = proj(t, layer).float()
        if normalize:
            target_stats = channel_stats(target, ~valid, eps)
            s = standardize(s, ~valid, stats=None if stats == "own" else target_stats, eps=eps)
            target = standardize(target, stats=target_stats)
        values[name] = _reduce(_sq_error(s, target, valid), valid, s.shape[-1], reduction)
    total = torch.stack(list(values.values())).sum()
    return total, values
