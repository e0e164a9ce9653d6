"""An exponential moving average of the weights (``train.ema: DECAY``), on
:class:`torch.optim.swa_utils.AveragedModel` with :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`.

After every optimiser step ``w_ema ← decay · w_ema + (1 − decay) · w`` for every parameter and
buffer (the first step copies). When EMA is on, the trainer validates the averaged model, picks
``best.pt`` by its AP and saves the averaged weights as the checkpoint's ``model``, so ``eval``,
``predict``, ``export`` and ``cache-teachers`` use them without knowing; the weights being trained
go into ``train_state["ema"]["live"]`` so that ``--resume`` continues both exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kacli.errors import KacliError


def check_decay(decay: float) -> float:
    """A decay must lie strictly between 0 (no averaging) and 1 (weights never move)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"must be in (0, 1), got {decay!r}")
    return float(decay)


class WeightEMA:
    """The moving average of ``model``'s parameters and buffers (a copy on the same device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = check_decay(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict names as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (the bare model, not a DDP wrapper) into the average."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def checkpoint_fields(self, live: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """``(model, train_state["ema"])`` for a checkpoint: the averaged weights, and the decay, the
        number of updates and the live (trained) weights needed to resume."""
        return self.state_dict(), {
            "decay": self.decay,
            "updates": int(self.averaged.n_averaged),
            "live": {k: v.detach().cpu() for k, v in live.items()},
        }

    def restore(self, model: nn.Module, ckpt: Mapping[str, Any], path: str | Path) -> None:
        """Resume: the live weights into ``model``, the checkpoint's ``model`` into the average."""
        state = (ckpt.get("train_state") or {}).get("ema")
        if not state:
            raise KacliError(
                f"last.pt was written without train.ema; resume with the run's own settings (here train.ema: {self.decay})",
                path,
            )
        model.load_state_dict(state["live"])
        self.module.load_state_dict(ckpt["model"])
        self.averaged.n_averaged.fill_(int(state["updates"]))


def refuse_ema_state(ckpt: Mapping[str, Any], path: str | Path) -> None:
    """Resuming without EMA a run that had it would continue from the averaged weights: refuse."""
    state = (ckpt.get("train_state") or {}).get("ema")
    if state:
        raise KacliError(
            f"last.pt was written with train.ema: {state.get('decay')}; resume with the run's own settings", path
        )
