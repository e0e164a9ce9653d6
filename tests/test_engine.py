"""The training loop's guards and extras on a toy regression model: a NaN or infinite loss stops the
run by name, EMA weights are what gets evaluated, saved and resumed, and the logs hold every
number metrics.jsonl holds."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kacli.engine.distributed import DistInfo
from kacli.engine.train import Trainer, TrainSetup
from kacli.errors import KacliError
from kacli.models.checkpoint import load_checkpoint

N, BATCH = 12, 4  # 3 steps per epoch


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return TensorDataset(x, y)


def collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


class Loss:
    """Two terms, ``loss_mse`` and ``loss_l1``; ``poison = (call, term, value)`` replaces one term at
    the ``call``-th call (1-based)."""

    def __init__(self, poison=None):
        self.poison = poison
        self.step = 0

    def __call__(self, model, batch, device):
        self.step += 1
        x, y = batch
        pred = model(x.to(device))
        terms = {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": (pred - y).abs().mean()}
        if self.poison and self.step == self.poison[0]:
            terms[self.poison[1]] = terms[self.poison[1]] * 0 + self.poison[2]
        terms["total"] = terms["loss_mse"] + 0.5 * terms["loss_l1"]
        return terms


def setup(out, epochs=3, **kw) -> TrainSetup:
    return TrainSetup(
        out_dir=out, epochs=epochs, batch_size=BATCH, lr=0.05, lr_backbone=0.0, weight_decay=0.0, lr_drop=2,
        clip_max_norm=0.0, seed=0, workers=0, eval_every=1, amp=False,
        checkpoint_base={"kind": "detr", "arch": {}, "label_map": {"ids": [1], "names": ["x"]}},
        signature={"toy": 1}, **kw,
    )  # fmt: skip


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def evaluate(m):
    """A validation 'AP' that rises as the weights approach the truth (a pure function of them)."""
    x, y = data().tensors
    with torch.no_grad():
        err = float(((m(x) - y) ** 2).mean())
    return {"AP": 1.0 / (1.0 + err), "AP50": 1.0 / (1.0 + err / 2)}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- NaN / inf --------------------------------------------------------------------------------------


@pytest.mark.parametrize("term, value", [("loss_l1", math.nan), ("loss_mse", math.inf)])
def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_pt(tmp_path, term, value):
    Trainer(model(), Loss(), data(), collate, setup(tmp_path, epochs=1), DistInfo(), evaluate).fit()
    before = sha(tmp_path / "last.pt")
    lines = (tmp_path / "metrics.jsonl").read_text()

    # resumed at epoch 2: its 2nd step is the run's step 5
    t = Trainer(model(), Loss(poison=(2, term, value)), data(), collate, setup(tmp_path, epochs=3), DistInfo(), evaluate)
    with pytest.raises(KacliError) as e:
        t.fit(resume=True)
    msg = e.value.one_line()
    assert "step 5 " in msg and "epoch 2" in msg and f"loss term {term} is {value}" in msg, msg
    assert len(msg.splitlines()) == 1
    assert sha(tmp_path / "last.pt") == before  # epoch 1's checkpoint, untouched
    assert (tmp_path / "metrics.jsonl").read_text() == lines
