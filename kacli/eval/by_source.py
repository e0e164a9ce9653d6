"""COCO metrics per data source, for a student merged from detectors trained on different datasets.

A source is a group of validation images and the categories their annotations are complete for
(vehicles on one dataset's images, animals on another's). Each source is scored with pycocotools'
COCOeval on its images and categories alone (:func:`kacli.eval.coco_eval.coco_metrics`); a
detection of another source's category on its images is neither right nor wrong there, since
nobody annotated it.

The ``union`` row scores every category on the images of the sources that annotate it, and only
there: its ground truth and detections keep only the (image, category) pairs some source
annotates, and COCOeval runs on them (a pair with neither is skipped by pycocotools, as for any
image without ground truth or detections of a category). Each category's AP is then the AP over
its sources' images; with disjoint sources it is the category's AP in its own source's row, and
with one source covering every image it is plain COCOeval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kacli.data.manifest import COMPLETE_KEY, UNION
from kacli.errors import KacliError
from kacli.eval.coco_eval import SUMMARY_KEYS, coco_metrics



def _restricted(gt: Mapping, detections: list[Mapping], images: list[int], cats: list[int], names: dict,
                keep=None) -> dict:
    """:func:`coco_metrics` over ``images`` × ``cats`` (ground truth and detections on other images
    dropped; ``keep(image_id, category_id)`` drops more), as a source's row: ``per_task`` replaced
    by ``categories``, the ids scored."""
    if not images or not cats:
        result: dict = {key: None for key in SUMMARY_KEYS}
        result["per_category"] = {c: {"name": names[c], "AP": None, "AP50": None} for c in cats}
        result["images"] = len(images)
    else:
        on = set(images)

        def kept(a) -> bool:
            return a["image_id"] in on and (keep is None or keep(a["image_id"], a["category_id"]))

        sub = {"images": [im for im in gt["images"] if im["id"] in on],
               "annotations": [a for a in gt["annotations"] if kept(a)], "categories": gt["categories"]}
        result = coco_metrics(sub, [d for d in detections if kept(d)], category_ids=cats)
        result.pop("per_task")
    result["categories"] = list(cats)
    return result


def sources_of(gt: Mapping) -> dict[str, tuple[list[int], list[int]]] | None:
    """``{source: (image ids, complete category ids)}`` of a split written by ``merge-tasks`` (its
    images carry ``source``, the file ``complete_category_ids``); None for a single-dataset split,
    where every image is annotated for every category."""
    complete = gt.get(COMPLETE_KEY)
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
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise KacliError(f"ground truth is not a COCO dict: no {key!r} list")
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    known_images = {im["id"] for im in gt["images"]}
    for d in detections:
        if d["image_id"] not in known_images:
            raise KacliError(f"detection for image id {d['image_id']!r}, which is not in the ground truth")
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
    out = {name: _restricted(gt, detections, images, cats, names) for name, (images, cats) in groups.items()}
    pairs = {(i, c) for images, cats in groups.values() for i in images for c in cats}
    all_images = sorted({i for i, _ in pairs})
    all_cats = sorted({c for _, c in pairs})
    out[UNION] = _restricted(gt, detections, all_images, all_cats, names, keep=lambda i, c: (i, c) in pairs)
    return out

