"""Task-level amalgamation (Sec. III-C, Eq. 9–11): the student mimics the pooled teacher predictions.

1. Each teacher's class distribution over its own ``C_t`` classes (+ no-object) is padded to the
   student's label space of ``C`` classes (+ no-object): zeros for the other tasks' classes, the
   teacher's no-object mass on the student's no-object slot ``C`` (:func:`pad_teacher_probs`).
   Teachers may have different numbers of classes and queries.
2. All teachers' predictions of an image are pooled; confidence = max non-background probability;
   targets under the threshold are dropped and the top K kept (:func:`pool_teachers`).
3. The student's queries are Hungarian-matched to the targets with the cost (Eq. 10)
   ``α_kl·KL(p_t‖p̂) + α_l1·L1 + α_giou·(1 − GIoU) − α_conf·conf``; ``min(Q, M)`` pairs per image.
4. Loss (Eq. 11) over matched pairs: ``conf·(β_kl·KL + β_l1·L1 + β_giou·(1 − GIoU))``, divided by
   the number of matched pairs of the batch.
5. Student queries matched to no teacher prediction are sent to "no object": ``−log p̂_C`` summed
   over them, divided by the same number of pairs, weighted by ``noobj_weight`` (as DETR's
   criterion weighs its no-object class by ``eos_coef``; the official code does the same). Eq. 11
   alone leaves them untaught, so without ground truth nothing would teach "no object".

Student classifiers. The rule above is a softmax student's (DETR). A sigmoid student (Conditional
DETR, ``classifier="sigmoid"``, ``pred_logits (B, Q, C)``) reads the same padded targets as
per-class probabilities ``t_c`` (the first C entries; the no-object entry is what no class takes)
and its KL becomes the sum over the C classes of the binary KL ``KL(Bern(t_c) ‖ Bern(σ(x_c)))``,
in the matching cost and in the loss alike (zero exactly when every σ(x_c) = t_c); the other tasks'
classes have t_c = 0; an unmatched query's no-object term is ``−Σ_c log(1 − σ(x_c))`` (every
class 0). Temperature must be 1 for it. Every teacher reaches this module as a distribution over
its classes + no object, whatever its own classifier
(:func:`kacli.teachers.labels.teacher_logits` writes down how a sigmoid teacher becomes one).

Defaults follow UP-DETR's weights (class 1, L1 5, GIoU 2) for both α and β. Boxes are normalised
``cxcywh``; L1 is summed over the four coordinates, as in DETR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from kacli.runtime import rank_mean_count


def _class_index(class_index: Tensor | Sequence[int], num_teacher_classes: int, num_classes: int) -> Tensor:
    idx = torch.as_tensor(class_index, dtype=torch.long).reshape(-1)
    if idx.numel() != num_teacher_classes:
        raise ValueError(f"class_index has {idx.numel()} entries for a teacher with {num_teacher_classes} classes")
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"class_index values must lie in [0, {num_classes})")
    if idx.unique().numel() != idx.numel():
        raise ValueError("class_index maps two teacher classes to one student class")
    return idx


def pad_teacher_probs(
    logits: Tensor,
    class_index: Tensor | Sequence[int],
    num_classes: int,
    temperature: float = 1.0,
) -> Tensor:
    """Teacher class distribution padded to the student's label space.

    Args:
        logits: ``(B, Q, C_t + 1)`` teacher logits, last entry = no object.
        class_index: ``(C_t,)`` int64, the student class index of each teacher class.
        num_classes: C, the student's class count.
        temperature: softmax temperature T (> 0).

    Returns:
        ``probs (B, Q, C + 1)`` float32: ``softmax(logits / T)`` with teacher class c at
        ``class_index[c]``, the no-object probability at C, zeros elsewhere.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    c_t = logits.shape[-1] - 1
    idx = _class_index(class_index, c_t, num_classes).to(logits.device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    out = probs.new_zeros(*probs.shape[:-1], num_classes + 1)
    out[..., idx] = probs[..., :c_t]
    out[..., num_classes] = probs[..., c_t]
    return out


def temper(probs: Tensor, temperature: float) -> Tensor:
    """``softmax(log(probs) / T)``: a distribution at temperature T from one at T = 1.

    Zeros stay zero, so ``temper(pad_teacher_probs(l, i, C), T) == pad_teacher_probs(l, i, C, T)``.
    """
    if temperature == 1.0:
        return probs
    p = probs.clamp(min=0) ** (1.0 / temperature)
    return p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


def confidence(probs: Tensor) -> Tensor:
    """``L_conf``: the largest non-background probability, ``(…, C + 1) → (…)``."""
    return probs[..., :-1].max(dim=-1).values


def pool_teachers(
    teachers: Sequence[tuple[Tensor, Tensor]],
    threshold: float = 0.0,
    topk: int | None = None,
) -> list[dict[str, Tensor]]:
    """Pool all teachers' padded predictions per image, drop the unconfident ones, keep the top K.

    Args:
        teachers: per teacher ``(probs (B, Q_t, C + 1), boxes (B, Q_t, 4))``; Q_t may differ.
        threshold: targets with confidence ``< threshold`` are dropped.
        topk: keep at most this many targets per image (highest confidence); None keeps all.

    Returns:
        One dict per image, targets sorted by decreasing confidence (stable: ties keep the
        pooled order, teacher by teacher, query by query): ``probs (M, C + 1)``,
        ``boxes (M, 4)``, ``conf (M,)``, ``teacher (M,)`` and ``query (M,)`` int64 (where each
        target came from).
    """
    if not teachers:
        raise ValueError("pool_teachers needs at least one teacher")
    if topk is not None and topk < 0:
        raise ValueError(f"topk must be non-negative or None, got {topk}")
    probs = torch.cat([p for p, _ in teachers], dim=1)  # (B, ΣQ_t, C + 1)
    boxes = torch.cat([b for _, b in teachers], dim=1).float()
    device = probs.device
    teacher_id = torch.cat([torch.full((p.shape[1],), k, dtype=torch.long, device=device)
                            for k, (p, _) in enumerate(teachers)])
    query_id = torch.cat([torch.arange(p.shape[1], device=device) for p, _ in teachers])
    conf = confidence(probs)  # (B, M)
    # every image at once: sort by confidence (stable), then the kept ones are a prefix
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # (B, M)
    conf = conf.gather(1, order)
    probs = probs.gather(1, order[..., None].expand(-1, -1, probs.shape[-1]))
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    teacher_id, query_id = teacher_id[order], query_id[order]
    counts = (conf >= threshold).sum(dim=1)
    if topk is not None:
        counts = counts.clamp(max=topk)
    return [{"probs": probs[b, :c], "boxes": boxes[b, :c], "conf": conf[b, :c],
             "teacher": teacher_id[b, :c], "query": query_id[b, :c]} for b, c in enumerate(counts.tolist())]


def _kl_matrix(target: Tensor, log_pred: Tensor) -> Tensor:
    """``KL(target_j ‖ pred_i)`` for every pair: target ``(M, K)``, log_pred ``(Q, K)`` → ``(Q, M)``."""
    neg_entropy = torch.xlogy(target, target).sum(dim=-1)  # (M,), 0·log 0 = 0
    return neg_entropy[None, :] - log_pred @ target.T


def _kl_pairs(target: Tensor, log_pred: Tensor) -> Tensor:
    """``KL(target_k ‖ pred_k)`` row by row: ``(K, C + 1)`` each → ``(K,)``."""
    return (torch.xlogy(target, target) - target * log_pred).sum(dim=-1)


def _bernoulli_neg_entropy(target: Tensor) -> Tensor:
    """``Σ_c t log t + (1 − t) log(1 − t)``: ``(M, C)`` → ``(M,)``."""
    return (torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)).sum(dim=-1)


def _binary_kl_matrix(target: Tensor, logits: Tensor) -> Tensor:
    """``Σ_c KL(Bern(t_jc) ‖ Bern(σ(x_ic)))`` for every pair: target ``(M, C)``, logits ``(Q, C)`` → ``(Q, M)``."""
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    return _bernoulli_neg_entropy(target)[None, :] - log_1mp.sum(dim=-1)[:, None] - (log_p - log_1mp) @ target.T


def _binary_kl_pairs(target: Tensor, logits: Tensor) -> Tensor:
    """``Σ_c KL(Bern(t_kc) ‖ Bern(σ(x_kc)))`` row by row: ``(K, C)`` each → ``(K,)``."""
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    return _bernoulli_neg_entropy(target) - (target * log_p + (1 - target) * log_1mp).sum(dim=-1)


class TaskAmalgamationLoss(nn.Module):
    """Hungarian distillation from the pooled teacher predictions (Eq. 9–11).

    Args:
        num_classes: C, the student's class count (no-object is index C).
        alpha: matching-cost weights ``(α_kl, α_l1, α_giou)`` (Eq. 10's α1 and α2·L_box).
        alpha_conf: α3, the weight of the confidence bonus in the matching cost.
        beta_kl, beta_l1, beta_giou: loss weights (Eq. 11's β1 and β2·L_box).
        threshold: teacher targets with confidence below it are dropped before matching.
        topk: at most this many targets per image (by confidence); None keeps all.
        temperature: T for the class distributions in the KL terms (teacher and student both
            softened; the KL is multiplied by T², as usual in distillation). Confidence, used for
            filtering and as the pair weight, always comes from the T = 1 teacher distribution.
        noobj_weight: weight of ``loss_ta_noobj`` (unmatched queries → no object); 0 turns it off.
        classifier: the student's, ``softmax`` (logits ``(B, Q, C + 1)``) or ``sigmoid``
            (``(B, Q, C)``, binary KL per class; see the module docstring).

    ``forward`` returns ``loss_ta_kl``, ``loss_ta_l1``, ``loss_ta_giou`` (each ``Σ conf·term /
    num_pairs``, unweighted), ``loss_ta_noobj`` (``Σ_unmatched −log p̂_C / num_pairs``, when
    ``noobj_weight`` > 0), the same with ``_<i>`` for ``aux_outputs[i]`` and ``total`` (the
    weighted sum over all outputs). ``num_pairs`` is the number of matched pairs in the batch,
    averaged over ranks when torch.distributed is initialised (so every rank divides by the same
    number, as DETR does with its box count), and clamped to at least 1.
    """

    def __init__(
        self,
        num_classes: int,
        alpha: tuple[float, float, float] = (1.0, 5.0, 2.0),
        alpha_conf: float = 1.0,
        beta_kl: float = 1.0,
        beta_l1: float = 5.0,
        beta_giou: float = 2.0,
        threshold: float = 0.1,
        topk: int | None = None,
        temperature: float = 1.0,
        noobj_weight: float = 0.0,
        classifier: str = "softmax",
    ):
        super().__init__()
        if classifier not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown classifier {classifier!r} (softmax or sigmoid)")
        if classifier == "sigmoid" and temperature != 1.0:
            raise ValueError(f"a sigmoid student's TA takes no temperature (it must be 1, got {temperature})")
        self.classifier = classifier
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if len(alpha) != 3:
            raise ValueError("alpha must be (α_kl, α_l1, α_giou)")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if topk is not None and topk < 0:
            raise ValueError(f"topk must be non-negative or None, got {topk}")
        self.num_classes = num_classes
        self.alpha = tuple(float(a) for a in alpha)
        self.alpha_conf = float(alpha_conf)
        if not noobj_weight >= 0:
            raise ValueError(f"noobj_weight must be non-negative, got {noobj_weight}")
        self.beta = {"kl": float(beta_kl), "l1": float(beta_l1), "giou": float(beta_giou)}
        if noobj_weight > 0:
            self.beta["noobj"] = float(noobj_weight)
        self.threshold = float(threshold)
        self.topk = topk
        self.temperature = float(temperature)

    def prepare_targets(
        self,
        teacher_logits: Sequence[Tensor],
        teacher_boxes: Sequence[Tensor],
        class_index: Sequence[Tensor | Sequence[int]],
    ) -> list[dict[str, Tensor]]:
        """Pad, pool and filter the teachers' predictions (see :func:`pool_teachers`).

        Args:
            teacher_logits: per teacher ``(B, Q_t, C_t + 1)``.
            teacher_boxes: per teacher ``(B, Q_t, 4)`` normalised cxcywh.
            class_index: per teacher ``(C_t,)`` student class indices.

        Returns:
            Per image the pooled targets; ``probs`` at T = 1 and ``soft`` at the loss temperature.
        """
        if not (len(teacher_logits) == len(teacher_boxes) == len(class_index)) or not teacher_logits:
            raise ValueError(f"{len(teacher_logits)} teacher logits, {len(teacher_boxes)} teacher boxes, "
                             f"{len(class_index)} class indices: need one of each per teacher")
        padded = []
        for logits, boxes, idx in zip(teacher_logits, teacher_boxes, class_index):
            if boxes.shape != (*logits.shape[:2], 4):
                raise ValueError(f"teacher boxes {tuple(boxes.shape)} do not fit logits {tuple(logits.shape)}")
            padded.append((pad_teacher_probs(logits.detach(), idx, self.num_classes), boxes.detach()))
        targets = pool_teachers(padded, self.threshold, self.topk)
        for t in targets:
            t["soft"] = temper(t["probs"], self.temperature)
        return targets

    @torch.no_grad()
    def match(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Hungarian matching (Eq. 9–10), per image ``(src query indices, target indices)``."""
        return self.match_heads([outputs], targets)[0]

    @torch.no_grad()
    def match_heads(
        self, heads: Sequence[dict[str, Tensor]], targets: list[dict[str, Tensor]]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """:meth:`match` for several decoder outputs at once (the final one and the auxiliary ones).

        The cost of every (head, image, query) against every pooled target of the batch is computed
        in one go — ``(L·B·Q, M_total)``, few large operations instead of many small ones per image —
        and each image's block is then assigned by scipy. Returns ``[head][image] → (rows, cols)``.
        """
        empty = torch.empty(0, dtype=torch.long)
        sizes = [int(t["conf"].shape[0]) for t in targets]
        n_heads, n_img = len(heads), len(targets)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in range(n_img)] for _ in range(n_heads)]
        logits = torch.stack([h["pred_logits"] for h in heads]).float()  # (L, B, Q, C+1)
        boxes = torch.stack([h["pred_boxes"] for h in heads]).float()  # (L, B, Q, 4)
        n_q = logits.shape[2]
        device = logits.device
        a_kl, a_l1, a_giou = self.alpha
        temp = self.temperature
        soft = torch.cat([t["soft"] for t in targets]).to(device).float()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
        conf = torch.cat([t["conf"] for t in targets]).to(device).float()
        if self.classifier == "sigmoid":
            class_cost = _binary_kl_matrix(soft[:, :-1], logits.flatten(0, 2))
        else:
            class_cost = _kl_matrix(soft, torch.log_softmax(logits / temp, dim=-1).flatten(0, 2)) * temp**2
        pred_boxes = boxes.flatten(0, 2)
        cost = (
            a_kl * class_cost
            + a_l1 * torch.cdist(pred_boxes, tgt_boxes, p=1)
            + a_giou * (1.0 - generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                                  box_convert(tgt_boxes, "cxcywh", "xyxy")))
            - self.alpha_conf * conf[None, :]
        )
        cost = cost.view(n_heads, n_img, n_q, -1).cpu()
        blocks = cost.split(sizes, dim=-1)
        out = []
        for h in range(n_heads):
            per_image = []
            for b in range(n_img):
                if sizes[b] == 0:
                    per_image.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(blocks[b][h, b].numpy())
                per_image.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            out.append(per_image)
        return out

    def num_pairs(self, targets: list[dict[str, Tensor]], num_queries: int, device) -> Tensor:
        """Matched pairs in the batch (``Σ_b min(Q, M_b)``), averaged over ranks, at least 1."""
        return rank_mean_count(sum(min(num_queries, t["conf"].shape[0]) for t in targets), device)

    def pair_losses(
        self,
        heads: Sequence[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        indices: list[list[tuple[Tensor, Tensor]]],
        num: Tensor,
    ) -> list[dict[str, Tensor]]:
        """Eq. 11's terms for every decoder output at once, each ``Σ_pairs conf·term / num``.

        Args:
            heads: decoder outputs with ``pred_logits (B, Q, C + 1)`` and ``pred_boxes (B, Q, 4)``.
            targets: per image the pooled targets (:meth:`prepare_targets`).
            indices: ``[head][image] → (query indices, target indices)`` (:meth:`match_heads`).
            num: the divisor (:meth:`num_pairs`).

        Returns:
            Per head ``{"kl", "l1", "giou"}`` scalars, and ``"noobj"`` when its weight is positive.
            All pairs of all heads go through one log-softmax, KL, L1 and GIoU; the sums are split
            by head afterwards.
        """
        logits = torch.stack([h["pred_logits"] for h in heads])  # (H, B, Q, C+1)
        boxes = torch.stack([h["pred_boxes"] for h in heads])  # (H, B, Q, 4)
        device = logits.device
        sizes = [int(t["conf"].shape[0]) for t in targets]
        offsets = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
        head_id, image_id, src, tgt = [], [], [], []
        for h, per_image in enumerate(indices):
            for b, (rows, cols) in enumerate(per_image):
                head_id.append(torch.full_like(rows, h))
                image_id.append(torch.full_like(rows, b))
                src.append(rows)
                tgt.append(cols)
        head_id, image_id, src, tgt = (torch.cat(x).to(device) for x in (head_id, image_id, src, tgt))
        flat = offsets[image_id] + tgt
        soft = torch.cat([t["soft"] for t in targets]).to(device).float()[flat]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()[flat]
        conf = torch.cat([t["conf"] for t in targets]).to(device).float()[flat]
        pred_logits = logits[head_id, image_id, src].float()
        if self.classifier == "sigmoid":
            kl = _binary_kl_pairs(soft[:, :-1], pred_logits)
        else:
            kl = _kl_pairs(soft, torch.log_softmax(pred_logits / self.temperature, dim=-1)) * self.temperature**2
        pred_boxes = boxes[head_id, image_id, src].float()
        l1 = (pred_boxes - tgt_boxes).abs().sum(dim=-1)
        giou = generalized_box_iou_loss(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                        box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="none")
        terms = torch.stack([kl, l1, giou], dim=1) * conf[:, None]  # (pairs, 3)
        per_head = terms.new_zeros(len(heads), 3).index_add(0, head_id, terms) / num  # (H, 3)
        out = [{"kl": row[0], "l1": row[1], "giou": row[2]} for row in per_head]
        if "noobj" in self.beta:
            # −log p̂(no object) of every query not matched in its head, at T = 1 (sigmoid: Σ_c log(1 − p̂_c))
            if self.classifier == "sigmoid":
                log_noobj = F.logsigmoid(-logits.float()).sum(dim=-1)  # (H, B, Q)
            else:
                log_noobj = torch.log_softmax(logits.float(), dim=-1)[..., -1]  # (H, B, Q)
            unmatched = torch.ones_like(log_noobj, dtype=torch.bool)
            unmatched[head_id, image_id, src] = False
            noobj = -(log_noobj * unmatched).sum(dim=(1, 2)) / num  # (H,)
            for row, value in zip(out, noobj):
                row["noobj"] = value
        return out

    def forward(
        self,
        outputs: dict,
        teacher_logits: Sequence[Tensor],
        teacher_boxes: Sequence[Tensor],
        class_index: Sequence[Tensor | Sequence[int]],
    ) -> dict[str, Tensor]:
        """TA losses for the student's final and auxiliary decoder outputs.

        Args:
            outputs: ``pred_logits (B, Q, C + 1)``, ``pred_boxes (B, Q, 4)`` and optionally
                ``aux_outputs`` (list of dicts with the same two keys).
            teacher_logits, teacher_boxes, class_index: see :meth:`prepare_targets`.

        Returns:
            ``loss_ta_kl``, ``loss_ta_l1``, ``loss_ta_giou`` (and ``loss_ta_noobj``), their ``_<i>``
            auxiliary versions and ``total``.
        """
        logits = outputs["pred_logits"]
        expected = self.num_classes + (self.classifier == "softmax")
        if logits.shape[-1] != expected:
            raise ValueError(f"student logits have {logits.shape[-1]} classes, expected {expected} "
                             f"({self.classifier} classifier)")
        targets = self.prepare_targets(teacher_logits, teacher_boxes, class_index)
        if len(targets) != logits.shape[0]:
            raise ValueError(f"teachers cover {len(targets)} images, the student {logits.shape[0]}")
        num = self.num_pairs(targets, logits.shape[1], logits.device)
        losses: dict[str, Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        heads = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        outs = [out for _, out in heads]
        all_terms = self.pair_losses(outs, targets, self.match_heads(outs, targets), num)
        for (suffix, _), terms in zip(heads, all_terms):
            for key, value in terms.items():
                losses[f"loss_ta_{key}{suffix}"] = value
                total = total + self.beta[key] * value
        losses["total"] = total
        return losses
