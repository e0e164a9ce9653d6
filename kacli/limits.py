"""Limits that stop absurd inputs before they exhaust memory or disk, each raisable by an
environment variable (README and docs/ARCHITECTURE.md list them).

==================  ========================  ===========  ====================================================
limit               environment variable      default      what it bounds
==================  ========================  ===========  ====================================================
image pixels        ``KACLI_MAX_IMAGE_PIXELS``  100,000,000  width × height of an image file before it is decoded
image side          ``KACLI_MAX_IMAGE_SIDE``    4,096        sizes images are resized to: ``--size``, ``--max-size``,
                                                           ``aug.scales``, ``aug.max_size``, ``aug.eval_size``, ...
views               ``KACLI_MAX_VIEWS``         1,000        ``cache-teachers --views``
workers             ``KACLI_MAX_WORKERS``       4 × cores    DataLoader workers: ``train.workers``, ``--workers``
                                                (at least 8)
epochs              ``KACLI_MAX_EPOCHS``        100,000      ``train.epochs``, ``--epochs``
minutes             ``KACLI_MAX_MINUTES``       10,080       ``demo --minutes``, ``ablate --minutes`` (a week)
seeds               ``KACLI_MAX_SEEDS``         100          ``ablate --seeds`` (how many seeds)
==================  ========================  ===========  ====================================================

A value over its limit is refused with one line naming the variable to raise it. The variables
only raise a limit: a value under the default leaves the default in force. A seed itself
(``--seed``, ``train.seed``) must be in 0 … 2³²−1, what every random generator kacli seeds takes;
minutes must be a finite number.
"""

from __future__ import annotations

import math
import os

from kacli.errors import KacliError

DEFAULTS = {
    "KACLI_MAX_IMAGE_PIXELS": 100_000_000,
    "KACLI_MAX_IMAGE_SIDE": 4096,
    "KACLI_MAX_VIEWS": 1000,
    "KACLI_MAX_WORKERS": 8,  # the floor: the default is 4 × the CPU cores when that is more
    "KACLI_MAX_EPOCHS": 100_000,
    "KACLI_MAX_MINUTES": 7 * 24 * 60,
    "KACLI_MAX_SEEDS": 100,
}

#: The largest seed: numpy's generators take 0 … 2**32 − 1.
MAX_SEED = 2**32 - 1


def limit(var: str) -> int:
    """The limit ``var`` (one of :data:`DEFAULTS`): the environment's value when it is larger
    than the default, else the default."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default(var)
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise KacliError(f"environment variable {var}={raw!r} is not a whole number") from None
    return max(value, default(var))


def default(var: str) -> int:
    """The limit ``var`` without its environment variable (workers: 4 × the CPU cores, at least 8)."""
    if var == "KACLI_MAX_WORKERS":
        return max(DEFAULTS[var], 4 * (os.cpu_count() or 1))
    return DEFAULTS[var]


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


def check_limit(flag: str, value: int | float | None, var: str, unit: str = "", path=None) -> None:
    """Refuse ``value`` over the limit ``var`` (None: not given), naming the variable that raises it."""
    if value is None or value <= DEFAULTS[var]:
        return  # within the floor: no need to read the environment
    cap = limit(var)
    if value > cap:
        raise KacliError(f"{flag} is {value:g}{unit}, over the limit of {cap:,} (set {var} to raise it)", path)


def check_seed(flag: str, value: int | None, path=None) -> None:
    """Refuse a seed outside 0 … 2³²−1."""
    if value is not None and not 0 <= value <= MAX_SEED:
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}…"
        raise KacliError(f"{flag} must be in 0 … {MAX_SEED}, got {shown}", path)


def check_minutes(flag: str, value: float) -> None:
    """Refuse minutes that are not a finite positive number under ``KACLI_MAX_MINUTES``."""
    if not math.isfinite(value) or not value > 0:
        raise KacliError(f"{flag} must be a positive finite number, got {value}")
    check_limit(flag, value, "KACLI_MAX_MINUTES", " minutes")


def check_workers(flag: str, value: int | None, path=None) -> None:
    """Refuse a negative worker count or one over ``KACLI_MAX_WORKERS``."""
    if value is not None and value < 0:
        raise KacliError(f"{flag} must not be negative, got {value}", path)
    check_limit(flag, value, "KACLI_MAX_WORKERS", " workers", path)
