"""Partial labels: which classes an image's ground truth may teach, and masking the others out.

When detectors trained on different datasets are merged, an image is annotated only for its own
source's categories. Its target then carries ``complete`` (C,) bool in the student's class order:
True where the image's annotations are complete for that class. A class the image is not complete
for must not be taught "no object" by that image: its logit is removed from the image's softmax
(OpenVINO training_extensions' CrossDatasetDetectorHead does the same with a per-image valid-label
mask), so the cross-entropy of every query of that image runs over the valid classes and
"no object" only (``gt_loss: mask``). With ``gt_loss: marginal`` a query matched to no object is
instead taught "no object or one of the image's classes that are not valid" over the full softmax
(:func:`marginal_logits`), so a query on an unlabelled object of such a class is not pushed away
from it.

Valid classes of an image: those it is complete for, those any of its annotations carry (a class
with an annotation is a class that image can name, even when it is not exhaustively labelled; this
also keeps a matched query's target inside the softmax), and "no object". A target without
``complete`` is complete for every class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kacli.errors import KacliError


def complete_mask(target: dict, num_classes: int, device: torch.device | None = None) -> Tensor:
    """The image's ``complete`` (C,) bool (all True when the target has none)."""
    complete = target.get("complete")
    if complete is None:
        return torch.ones(num_classes, dtype=torch.bool, device=device)
    complete = torch.as_tensor(complete, device=device)
    if complete.shape != (num_classes,):
        raise KacliError(f"a target's 'complete' has shape {tuple(complete.shape)}, expected ({num_classes},) "
                         "(one flag per student class)")
    return complete.to(torch.bool)


def valid_classes(targets: Sequence[dict], num_classes: int, device: torch.device | None = None) -> Tensor:
    """Per image the classes its ground truth may teach: ``(B, C + 1)`` bool.

    ``valid[b, c]`` = ``complete[c]`` or class c among image b's labels; ``valid[b, C]`` (no object)
    is always True. With every image complete for every class, all True.
    """
    valid = torch.ones(len(targets), num_classes + 1, dtype=torch.bool, device=device)
    if not targets or all(t.get("complete") is None for t in targets):
        return valid
    valid[:, :num_classes] = torch.stack([complete_mask(t, num_classes, device) for t in targets])
    counts = [len(t["labels"]) for t in targets]  # every label's image, built on the host: one copy
    rows = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(counts)).to(device)
    valid[rows, torch.cat([t["labels"] for t in targets]).to(device)] = True
    return valid


def mask_logits(logits: Tensor, valid: Tensor) -> Tensor:
    """``logits (B, Q, C + 1)`` with ``−inf`` at the classes not ``valid (B, C + 1)`` for the image.

    The softmax of the result is the softmax over each image's valid classes (zeros elsewhere), and
    the masked entries pass no gradient. Where everything is valid the result equals ``logits``.
    """
    if valid.shape != (logits.shape[0], logits.shape[-1]):
        raise ValueError(f"valid mask {tuple(valid.shape)} does not fit logits {tuple(logits.shape)}")
    return logits.masked_fill(~valid[:, None, :].to(logits.device), float("-inf"))


def marginal_logits(logits: Tensor, valid: Tensor, unmatched: Tensor) -> Tensor:
    """:func:`mask_logits` of ``logits (B, Q, C + 1)`` whose "no object" entry, for the
    ``unmatched (B, Q)`` bool queries of images with a class not ``valid (B, C + 1)``, is
    ``log Σ_{c ∈ A} exp(z_c)``, A = {no object} ∪ the image's classes that are not valid.

    The softmax of the result at "no object" is then ``p_∅ + Σ_{c ∈ A, c ≠ ∅} p_c`` with p the softmax
    of all C + 1 logits (the valid classes and A together are every class once), so the cross-entropy
    with target "no object" is the marginal ``−log(p_∅ + Σ_{c not valid} p_c)``, and it passes its
    gradient to the masked logits through the log-sum-exp. Matched queries, and every query of an
    image whose classes are all valid, keep :func:`mask_logits`'s values exactly.
    """
    masked = mask_logits(logits, valid)
    noobj_or_missing = ~valid.to(logits.device)
    noobj_or_missing[:, -1] = True
    lse = torch.logsumexp(logits.masked_fill(~noobj_or_missing[:, None, :], float("-inf")), dim=-1)  # (B, Q)
    use = unmatched & (~valid).any(-1).to(logits.device)[:, None]
    noobj = torch.where(use, lse, masked[..., -1])
    return torch.cat([masked[..., :-1], noobj[..., None]], dim=-1)
