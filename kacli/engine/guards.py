"""Stop training on a NaN or infinite loss, naming the step and the loss term.

The check runs before the backward pass and the optimiser step, so the weights in memory are
those of the last good step, and ``last.pt`` (written at epoch ends and every
``checkpoint_every`` steps, never after a bad step) is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from kacli.errors import KacliError


def nonfinite_term(losses: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """The first loss term (in the loss function's order, ``total`` last) that is NaN or infinite,
    with its value; None when ``total`` is finite (a NaN term makes the weighted total NaN too,
    even at weight 0, so one synchronising check per step suffices)."""
    total = losses["total"]
    if bool(torch.isfinite(total.detach()).all()):
        return None
    for name, value in losses.items():
        if name != "total" and not bool(torch.isfinite(value.detach()).all()):
            return name, float(value.detach().float().reshape(-1)[0])
    return "total", float(total.detach().float().reshape(-1)[0])


def check_finite(losses: Mapping[str, torch.Tensor], step: int, epoch: int, run_dir: str | Path) -> None:
    """Raise a one-line :class:`KacliError` if a loss term is not finite.

    ``step`` counts optimiser steps from the start of the run (1-based); ``epoch`` is 1-based.
    """
    bad = nonfinite_term(losses)
    if bad is None:
        return
    name, value = bad
    raise KacliError(
        f"training stopped at step {step} (epoch {epoch}): loss term {name} is {value} "
        "(last.pt is left as it was; lower the learning rate or check the data)",
        run_dir,
    )
