"""A transformers folder scored like a kacli model: ``kacli eval`` and ``predict`` load either
(:func:`load_detector`, :func:`build_detector`), and a folder's classes are matched to the
dataset's categories by name (:func:`match_categories`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from kacli.data.names import name_key, rename_keys, renamed
from kacli.errors import KacliError
from kacli.models.checkpoint import build_model, load_checkpoint
from kacli.teachers.hf.folder import KIND, is_transformers_folder, load_transformers_folder


def load_detector(path: str | Path) -> dict[str, Any]:
    """A kacli checkpoint (file or run folder, :func:`kacli.models.checkpoint.load_checkpoint`) or a
    transformers folder (:func:`load_transformers_folder`): what ``kacli eval`` and ``predict`` score."""
    if is_transformers_folder(path):
        return load_transformers_folder(path)
    return load_checkpoint(path)


def match_categories(ckpt: dict[str, Any], categories: Mapping[int, str], renames: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """A transformers folder's dict made to score on a dataset: its named slots matched to the
    dataset's ``categories`` (``{id: name}``) by name (after ``renames``, as teachers are), the
    model restricted to the matched slots and the label map's ids the dataset's. A kacli
    checkpoint's dict is returned as it is (its ids are already category ids).

    Raises KacliError when no class of the folder is one of the dataset's categories."""
    if ckpt["kind"] != KIND:
        return ckpt
    keys = rename_keys(renames or {})
    by_name = {name_key(n): int(i) for i, n in categories.items()}
    slots, ids, names = [], [], []
    for slot, name in zip(ckpt["label_map"]["ids"], ckpt["label_map"]["names"]):
        cid = by_name.get(name_key(renamed(name, keys)))
        if cid is not None and cid not in ids:
            slots.append(int(slot))
            ids.append(cid)
            names.append(categories[cid])
    if not ids:
        have = ", ".join(ckpt["label_map"]["names"][:8])
        raise KacliError(f"none of the model's classes ({have}) is a category of the dataset", ckpt["path"])
    ckpt["model"].keep_slots(slots)
    return ckpt | {"label_map": {"ids": ids, "names": names}}


def build_detector(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model of :func:`load_detector`'s dict (a transformers folder's is built when loaded)."""
    return ckpt["model"] if ckpt["kind"] == KIND else build_model(dict(ckpt))


__all__ = ["build_detector", "load_detector", "match_categories"]
