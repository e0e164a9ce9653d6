"""Category names matched across datasets and teachers: case- and space-insensitive, with renames.

``"Traffic Light"``, ``"traffic light"`` and ``"trafficlight"`` are one category; a rename map
``{old: new}`` (its keys matched the same way) turns one source's name into another's, e.g.
``{"motorcycle": "motorbike"}`` to match COCO's name to VOC's.
"""

from __future__ import annotations

from collections.abc import Mapping


def name_key(name: str) -> str:
    """The key names are matched by: no whitespace, case-folded."""
    return "".join(str(name).split()).casefold()


def rename_keys(renames: Mapping[str, str]) -> dict[str, str]:
    """``{old: new}`` → ``{name_key(old): new}``."""
    return {name_key(old): str(new) for old, new in renames.items()}


def renamed(name: str, keys: Mapping[str, str]) -> str:
    """``name`` after a rename map of :func:`rename_keys` (unchanged when it names no rename)."""
    return keys.get(name_key(name), name)
