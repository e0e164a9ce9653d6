"""A teacher's classes in its task's class order: match by name, remap the logits.

A teacher's label map need not be its task's: a COCO DETR teaches a task of 10 of COCO's 80
categories, or a detector trained elsewhere names a category as another dataset does (matched
after the manifest's rename map). :func:`match_classes` finds each task class's teacher class by
name (:mod:`kacli.data.names`); :func:`remap_logits` puts the teacher's logits in the task's
order and folds every other teacher class into "no object", so the cache stores, for each task
class, the teacher's own probability, and for "no object" the rest.

Teachers of both classifier kinds (:func:`teacher_logits`). What the cache and the online teachers
hand the losses is, for every teacher, logits whose softmax is a distribution over its task's
classes + no object. A softmax teacher's (DETR) are its logits (remapped as above). A sigmoid
teacher (Conditional DETR) has a probability p_c = σ(x_c) per class, which need not sum to 1; its
distribution is

    q_c = p_c / max(1, Σ_c p_c)   for the task's classes (the teacher's other classes dropped),
    q_∅ = 1 − Σ_c q_c             ("no object": what no class takes; at least 1e-12),

stored as ``log q``. So q_c = p_c whenever the teacher's probabilities sum to at most 1 (the usual
case: one class per object), the student sees one kind of target whatever taught it, and the
losses (:mod:`kacli.losses.task`, :mod:`kacli.losses.pseudo`) need no teacher kind. A softmax
student learns this distribution (KL); a sigmoid student learns each q_c as its class's
probability (binary KL per class, no-object = every class 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kacli.data.names import name_key, rename_keys, renamed
from kacli.errors import KacliError


def match_classes(
    teacher_map: Mapping, task_name: str, task_names: Sequence[str], renames: Mapping[str, str], path: str | Path
) -> list[int]:
    """``class_map (C,)``: for task class k, the index of the teacher class of the same name.

    Args:
        teacher_map: the teacher's label map ``{ids, names}``.
        task_name, task_names: the task and its category names (task class order).
        renames: ``{old: new}`` applied to the teacher's names first (the manifest's).
        path: the teacher file errors name.

    Raises:
        KacliError: the teacher lacks one of the task's categories, or names one twice.
    """
    keys = rename_keys(renames)
    index: dict[str, int] = {}
    for j, n in enumerate(teacher_map["names"]):
        k = name_key(renamed(n, keys))
        if k in index:
            raise KacliError(f"label map names {n!r} twice (classes {index[k]} and {j}) after renaming", path)
        index[k] = j
    missing = [n for n in task_names if name_key(n) not in index]
    if missing:
        have = ", ".join(str(n) for n in list(teacher_map["names"])[:12]) + (" ..." if len(teacher_map["names"]) > 12 else "")
        raise KacliError(
            f"label map is not task {task_name!r}'s: it lacks {'category' if len(missing) == 1 else 'categories'} "
            f"{', '.join(repr(n) for n in missing)} (it has: {have})",
            path,
        )
    return [index[name_key(n)] for n in task_names]


def remap_logits(logits: Tensor, class_map: Sequence[int]) -> Tensor:
    """Teacher logits in the task's class order, the teacher's other classes folded into no-object.

    Args:
        logits: ``(..., C_t + 1)``, the teacher's classes then no-object.
        class_map: ``(C,)`` distinct teacher class indices, one per task class (a sequence, or an
            int64 tensor, best on ``logits``' device: then nothing is copied from the host).

    Returns:
        ``(..., C + 1)``: ``out[..., k] = logits[..., class_map[k]]`` and ``out[..., C] =
        logsumexp(no-object, every teacher class outside class_map)``; so ``softmax(out)[k]`` is
        the teacher's probability of task class k and ``softmax(out)[C]`` the sum of the rest.
    """
    c_t = logits.shape[-1] - 1
    idx = (class_map if isinstance(class_map, Tensor) else torch.as_tensor(list(class_map), dtype=torch.long)).to(logits.device)
    rest = torch.ones(c_t + 1, dtype=torch.bool, device=logits.device)
    rest[idx] = False  # no-object (index c_t) stays in the rest
    return torch.cat([logits[..., idx], logits[..., rest].logsumexp(-1, keepdim=True)], dim=-1)


NOOBJ_FLOOR = 1e-12  # the least "no object" probability a sigmoid teacher's distribution keeps (finite logs)


def sigmoid_to_distribution(logits: Tensor) -> Tensor:
    """A sigmoid classifier's logits ``(..., C)`` → log-probabilities ``(..., C + 1)`` over its C
    classes + no object, by the rule in the module docstring."""
    log_p = F.logsigmoid(logits.float())
    total = log_p.exp().sum(dim=-1, keepdim=True)
    log_q = log_p - total.clamp(min=1.0).log()
    noobj = (1.0 - total).clamp(min=NOOBJ_FLOOR).log()
    return torch.cat([log_q, noobj], dim=-1)


def teacher_logits(logits: Tensor, classifier: str, class_map: Sequence[int] | Tensor | None) -> Tensor:
    """A teacher's class outputs → logits ``(..., C + 1)`` over its task's C classes + no object.

    Args:
        logits: the teacher's ``pred_logits``: ``(..., C_t + 1)`` (softmax) or ``(..., C_t)`` (sigmoid).
        classifier: the teacher's, ``softmax`` or ``sigmoid``.
        class_map: ``(C,)`` the teacher class of each task class; None: the teacher's classes are
            the task's, in its order.
    """
    if classifier == "softmax":
        return logits if class_map is None else remap_logits(logits, class_map)
    if classifier != "sigmoid":
        raise ValueError(f"unknown classifier {classifier!r} (softmax or sigmoid)")
    if class_map is not None:
        idx = class_map if isinstance(class_map, Tensor) else torch.as_tensor(list(class_map), dtype=torch.long)
        logits = logits[..., idx.to(logits.device)]
    return sigmoid_to_distribution(logits)


def class_index(label_map: Mapping, teacher_maps: Sequence[Mapping], path: str | Path | None = None) -> list[Tensor]:
    """Per teacher, ``(C_t,)`` int64: the position in the union ``label_map`` of each of its
    (task's) classes, matched by category id.

    Raises:
        KacliError: a teacher's category is not in the union (naming ``path``).
    """
    pos = {int(c): k for k, c in enumerate(label_map["ids"])}
    try:
        return [torch.tensor([pos[int(c)] for c in lm["ids"]], dtype=torch.int64) for lm in teacher_maps]
    except KeyError as e:
        raise KacliError(f"a teacher's category {e} is not in the label map", path) from None
