"""COCO metrics per data source, for a student merged from detectors trained on different datasets.

A source is a group of validation images and the categories their annotations are complete for
(vehicles on one dataset's images, animals on another's). Each source is scored with pycocotools'
COCOeval restricted to its images (``params.imgIds``) and categories (``params.catIds``); a
detection of another source's category on its images is neither right nor wrong there, since
nobody annotated it.

The ``union`` row scores every category on the images of the sources that annotate it, and only
there: COCOeval evaluates all (category, image) pairs of the union, and the pairs no source
annotates are dropped before accumulation (pycocotools skips ``evalImgs`` entries that are None,
as it does for images without ground truth or detections of a category). Each category's AP is
then the AP over its sources' images; with disjoint sources it is the category's AP in its own
source's row, and with one source covering every image it is plain COCOeval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pycocotools.cocoeval import COCOeval

from kacli.errors import KacliError
from kacli.eval.coco_eval import (
    SUMMARY_KEYS,
    _coco_from_dict,
    _detections,
    _ground_truth,
    _mean_valid,
    _none_if_missing,
    _quiet,
)

UNION = "union"


def _evaluate(coco_gt, coco_dt, image_ids: list[int], cat_ids: list[int], names: dict,
              pairs: set[tuple[int, int]] | None = None) -> dict:
    """COCOeval over ``image_ids`` × ``cat_ids``; with ``pairs``, only the (image, category) pairs in it."""
    result: dict = {key: None for key in SUMMARY_KEYS}
    result["per_category"] = {c: {"name": names[c], "AP": None, "AP50": None} for c in cat_ids}
    result["images"] = len(image_ids)
    result["categories"] = list(cat_ids)
    if not image_ids or not cat_ids:
        return result
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = list(image_ids)
    ev.params.catIds = list(cat_ids)
    with _quiet():
        ev.evaluate()
        if pairs is not None:
            # evalImgs is laid out category-major, then area range, then image (COCOeval.evaluate)
            p = ev.params
            n_img, n_area = len(p.imgIds), len(p.areaRng)
            for k, cid in enumerate(p.catIds):
                for i, iid in enumerate(p.imgIds):
                    if (iid, cid) not in pairs:
                        for a in range(n_area):
                            ev.evalImgs[(k * n_area + a) * n_img + i] = None
        ev.accumulate()
        ev.summarize()
    for i, key in enumerate(SUMMARY_KEYS):
        result[key] = _none_if_missing(ev.stats[i])
    precision = ev.eval["precision"]  # (IoU, recall, category, area, maxDets); IoU 0 = .50
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        result["per_category"][cid] = {"name": names[cid], "AP": _mean_valid(p), "AP50": _mean_valid(p[0])}
    return result


def sources_of(gt: Mapping) -> dict[str, tuple[list[int], list[int]]] | None:
    """``{source: (image ids, complete category ids)}`` of a split written by ``merge-tasks`` (its
    images carry ``source``, the file ``complete_category_ids``); None for a single-dataset split,
    where every image is annotated for every category."""
    complete = gt.get("complete_category_ids")
    if not isinstance(complete, Mapping):
        return None
    images: dict[str, list[int]] = {str(name): [] for name in complete}
    for im in gt.get("images", []):
        name = im.get("source")
        if name in images:
            images[name].append(int(im["id"]))
    return {name: (images[name], [int(c) for c in complete[name]]) for name in images}


def source_metrics(
    gt: Mapping,
    detections: list[Mapping],
    sources: Mapping[str, tuple[Iterable[int], Iterable[int]]],
) -> dict[str, dict]:
    """pycocotools bbox metrics of each source, and of their union.

    Args:
        gt: COCO dict of the validation split (all sources' images and categories).
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
        sources: source name → ``(image ids, category ids)``: its validation images and the
            categories their annotations are complete for.

    Returns:
        ``{name: metrics}`` for each source, then ``"union"``; metrics are ``AP``, ``AP50``,
        ``AP75``, ``APs``, ``APm``, ``APl`` (``None`` without ground truth),
        ``per_category {id: {"name", "AP", "AP50"}}``, ``images`` and ``categories`` (the ids scored).

    Raises:
        KacliError: a source names an image or a category that is not in ``gt``, or is called "union".
    """
    gt_d = _ground_truth(gt)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt_d["categories"]}
    known_images = {im["id"] for im in gt_d["images"]}
    coco_gt = _coco_from_dict(gt_d)
    coco_dt = _coco_from_dict(_detections(gt_d, detections))
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for name, (image_ids, cat_ids) in sources.items():
        if name == UNION:
            raise KacliError(f"a source may not be called {UNION!r} (that name is the union's row)")
        images, cats = sorted(set(image_ids)), sorted(set(cat_ids))
        unknown = [i for i in images if i not in known_images]
        if unknown:
            raise KacliError(f"source {name!r}: image id {unknown[0]!r} is not in the ground truth")
        unknown = [c for c in cats if c not in names]
        if unknown:
            raise KacliError(f"source {name!r}: category id {unknown[0]!r} is not in the ground truth")
        groups[name] = (images, cats)
    out = {name: _evaluate(coco_gt, coco_dt, images, cats, names) for name, (images, cats) in groups.items()}
    pairs = {(i, c) for images, cats in groups.values() for i in images for c in cats}
    all_images = sorted({i for i, _ in pairs})
    all_cats = sorted({c for _, c in pairs})
    out[UNION] = _evaluate(coco_gt, coco_dt, all_images, all_cats, names, pairs)
    return out

