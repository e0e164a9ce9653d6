"""Limits that stop absurd inputs before they exhaust memory or disk, each raisable by an
environment variable (README and docs/ARCHITECTURE.md list them).

==================  ========================  ===========  ====================================================
limit               environment variable      default      what it bounds
==================  ========================  ===========  ====================================================
image pixels        ``KACLI_MAX_IMAGE_PIXELS``  100,000,000  width × height of an image file before it is decoded
image side          ``KACLI_MAX_IMAGE_SIDE``    4,096        sizes images are resized to: ``--size``, ``--max-size``,
                                                           ``aug.scales``, ``aug.max_size``, ``aug.eval_size``, ...
views               ``KACLI_MAX_VIEWS``         1,000        ``cache-teachers --views``
==================  ========================  ===========  ====================================================

A value over its limit is refused with one line naming the variable to raise it. The variables
only raise a limit: a value under the default leaves the default in force.
"""

from __future__ import annotations

import os

from kacli.errors import KacliError

DEFAULTS = {
    "KACLI_MAX_IMAGE_PIXELS": 100_000_000,
    "KACLI_MAX_IMAGE_SIDE": 4096,
    "KACLI_MAX_VIEWS": 1000,
}


def limit(var: str) -> int:
    """The limit ``var`` (one of :data:`DEFAULTS`): the environment's value when it is larger
    than the default, else the default."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return DEFAULTS[var]
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise KacliError(f"environment variable {var}={raw!r} is not a whole number") from None
    return max(value, DEFAULTS[var])


def max_image_pixels() -> int:
    return limit("KACLI_MAX_IMAGE_PIXELS")


def max_image_side() -> int:
    return limit("KACLI_MAX_IMAGE_SIDE")


def max_views() -> int:
    return limit("KACLI_MAX_VIEWS")


def side_problem(value: int) -> str | None:
    """Why ``value`` cannot be an image side to resize to (None when it can)."""
    if value < 1:
        return f"must be at least 1, got {value}"
    if value <= DEFAULTS["KACLI_MAX_IMAGE_SIDE"]:
        return None  # within the default: no need to read the environment (presets are built at import)
    cap = max_image_side()
    if value > cap:
        return f"is {value}, over the limit of {cap} pixels (set KACLI_MAX_IMAGE_SIDE to raise it)"
    return None


def check_side(flag: str, value: int | None, path=None) -> None:
    """Refuse ``--size``-like values outside ``1..KACLI_MAX_IMAGE_SIDE`` (None: not given)."""
    if value is None:
        return
    problem = side_problem(int(value))
    if problem:
        raise KacliError(f"{flag} {problem}", path)


def check_positive(flag: str, value: int | None, path=None) -> None:
    if value is not None and value < 1:
        raise KacliError(f"{flag} must be at least 1, got {value}", path)
