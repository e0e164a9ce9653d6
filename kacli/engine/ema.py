"""An exponential moving average of the weights (``train.ema: DECAY``), on
:class:`torch.optim.swa_utils.AveragedModel` with a warmed-up decay.

After every optimiser step ``w_ema ← d_n · w_ema + (1 − d_n) · w`` for every parameter and
buffer, where ``n`` is the number of updates already averaged (the first step copies) and
``d_n = min(decay, (1 + n) / (10 + n))``: the decay warms up, so the average forgets the random
initial weights within the first hundred steps instead of carrying them through a short run (with a
fixed 0.999 they still weigh e^(−steps/1000) at the end: 14 % after the demo teacher's 2,000 steps,
which scored 15 AP instead of 60; docs/DEMO.md). When EMA is on, the trainer validates the averaged model, picks
``best.pt`` by its AP and saves the averaged weights as the checkpoint's ``model``, so ``eval``,
``predict``, ``export`` and ``cache-teachers`` use them without knowing; the weights being trained
go into ``train_state["ema"]["live"]`` so that ``--resume`` continues both exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from kacli.errors import KacliError


def check_decay(decay: float) -> float:
    """A decay must lie strictly between 0 (no averaging) and 1 (weights never move)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"must be in (0, 1), got {decay!r}")
    return float(decay)


def warmed_decay(decay: float, averaged: int) -> float:
    """The decay of the update after ``averaged`` updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + averaged) / (10.0 + averaged))


class WeightEMA:
    """The moving average of ``model``'s parameters and buffers (a copy on the same device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = check_decay(decay)
        self._d = self.decay  # the warmed decay of the coming update, set by update()
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        """AveragedModel's ``multi_avg_fn``, called once per (device, dtype) group of tensors:
        ``avg ← d · avg + (1 − d) · current`` in place; integer buffers (BatchNorm's
        ``num_batches_tracked``) follow the model. ``num_averaged`` is a copy of the count on the
        tensors' device, not read here (reading it would wait for the device): ``d`` was computed
        from the count on the host."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self._d)
        else:
            torch._foreach_copy_(averaged, current)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict names as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (the bare model, not a DDP wrapper) into the average."""
        self._d = warmed_decay(self.decay, int(self.averaged.n_averaged))  # the count lives on the host
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
