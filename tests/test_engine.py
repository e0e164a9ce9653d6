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

from kacli.engine.config import TrainConfig
from kacli.engine.train import Trainer, TrainSetup
from kacli.errors import KacliError
from kacli.models.checkpoint import load_checkpoint
from kacli.runtime import DistInfo

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
    train = TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.05, lr_backbone=0.0, weight_decay=0.0, lr_drop=2,
                        clip_max_norm=0.0, seed=0, workers=0, eval_every=1, amp=False, **kw)
    return TrainSetup(
        out_dir=out, train=train,
        checkpoint_base={"kind": "detr", "arch": {}, "label_map": {"ids": [1], "names": ["x"]}},
        signature={"toy": 1},
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


# -- EMA --------------------------------------------------------------------------------------------


class Recording(Loss):
    """Records the live weights each step starts from (= the weights after the previous step)."""

    def __init__(self):
        super().__init__()
        self.seen: list[dict] = []

    def __call__(self, model, batch, device):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return super().__call__(model, batch, device)


def test_ema_is_what_gets_evaluated_and_saved(tmp_path):
    decay = 0.6
    rec = Recording()
    Trainer(model(), rec, data(), collate, setup(tmp_path, epochs=2, ema=decay), DistInfo(), evaluate).fit()
    last = load_checkpoint(tmp_path / "last.pt")
    live = last["train_state"]["ema"]["live"]
    # The weights after steps 1..6: what steps 2..6 started from, then the final live weights.
    after = rec.seen[1:] + [live]
    assert len(after) == 6 and last["train_state"]["ema"]["updates"] == 6
    ema = dict(after[0])
    for n, w in enumerate(after[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))  # the warmed-up decay: 0.18, 0.25, 0.31, 0.36, 0.4
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
    for k in ema:
        torch.testing.assert_close(last["model"][k], ema[k], atol=1e-6, rtol=0)
        assert not torch.allclose(last["model"][k], live[k], atol=1e-3)  # the average, not the live weights

    # Validation scored the averaged weights, and best.pt is the epoch whose average scored best.
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    m = model()
    m.load_state_dict(last["model"])
    assert rows[-1]["AP"] == pytest.approx(evaluate(m)["AP"], abs=1e-9)
    m.load_state_dict(live)
    assert rows[-1]["AP"] != pytest.approx(evaluate(m)["AP"], abs=1e-4)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["meta"]["metrics"]["AP"] == max(r["AP"] for r in rows)


def test_ema_decay_warms_up_to_the_configured_one():
    from kacli.engine.ema import warmed_decay

    assert warmed_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_decay(0.999, 90) == pytest.approx(0.91)
    assert warmed_decay(0.999, 10_000) == 0.999  # (10001/10010 = 0.99910 > 0.999)
    assert warmed_decay(0.5, 3) == pytest.approx(4 / 13)  # still warming
    assert warmed_decay(0.5, 10) == 0.5  # 11/20 > 0.5: capped
    assert warmed_decay(0.3, 3) == pytest.approx(0.3)


def test_ema_resumes_exactly(tmp_path):
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "a", epochs=3, ema=0.7), DistInfo(), evaluate).fit()
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "b", epochs=1, ema=0.7), DistInfo(), evaluate).fit()
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "b", epochs=3, ema=0.7), DistInfo(), evaluate).fit(
        resume=True
    )
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["train_state"]["ema"]["updates"] == 9
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=0)
        torch.testing.assert_close(b["train_state"]["ema"]["live"][k], a["train_state"]["ema"]["live"][k],
                                   atol=1e-6, rtol=0)  # fmt: skip


def test_resume_refuses_a_different_ema_setting(tmp_path):
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "on", epochs=1, ema=0.9), DistInfo(), evaluate).fit()
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "off", epochs=1), DistInfo(), evaluate).fit()
    with pytest.raises(KacliError, match="written with train.ema: 0.9"):
        Trainer(model(), Loss(), data(), collate, setup(tmp_path / "on", epochs=2), DistInfo(), evaluate).fit(resume=True)
    with pytest.raises(KacliError, match="written without train.ema"):
        Trainer(model(), Loss(), data(), collate, setup(tmp_path / "off", epochs=2, ema=0.9), DistInfo(),
                evaluate).fit(resume=True)  # fmt: skip


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_ema_outside_zero_one_is_a_config_error(bad):
    from kacli.config import from_dict
    from kacli.engine.config import TrainConfig

    with pytest.raises(KacliError, match=r"'ema'.*\(0, 1\)"):
        from_dict({"ema": bad}, TrainConfig, "run.yaml")
    assert from_dict({"ema": 0.999}, TrainConfig).ema == 0.999 and from_dict({}, TrainConfig).ema is None


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """6 demo images as train and val, split into the demo's two tasks, and a 2-epoch tiny run config."""
    import yaml

    from kacli.data.demo_data import make_demo_data
    from kacli.data.split import split_tasks

    root = tmp_path_factory.mktemp("engine")
    make_demo_data(root / "data", train_images=6, val_images=2, seed=1, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "train.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks")  # fmt: skip
    cfg = {"model": {"backbone": "tiny", "d_model": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 1,
                     "dim_feedforward": 64, "num_queries": 4, "dropout": 0.0, "tiny_widths": [8, 16, 16, 32]},
           "aug": {"scales": [64], "max_size": 64, "crop_p": 0.0, "flip_p": 0.0, "eval_size": 64},
           "train": {"epochs": 2, "batch_size": 3, "workers": 0, "lr": 1e-3}}  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_train_teacher_with_ema_saves_the_average(cli, tiny_tasks, tmp_path):
    from kacli.models.checkpoint import build_model

    run = tmp_path / "run"
    r = cli("train-teacher", "--tasks", tiny_tasks / "tasks" / "tasks.yaml", "--task", "convex",
            "--config", tiny_tasks / "run.yaml", "--ema", "0.5", "--device", "cpu", "--out", run)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ck = load_checkpoint(run / "last.pt")
    state = ck["train_state"]["ema"]
    assert state["decay"] == 0.5 and state["updates"] == 4
    changed = [k for k in ck["model"] if not torch.equal(ck["model"][k], state["live"][k])]
    assert any(k.startswith("class_embed") for k in changed)
    build_model(ck)  # the averaged weights are a complete model
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


@pytest.mark.parametrize("bad", ["0", "1", "1.5"])
def test_train_teacher_refuses_ema_outside_zero_one(cli, tiny_tasks, tmp_path, bad):
    from conftest import assert_one_line_error

    run = tmp_path / "run"
    r = cli("train-teacher", "--tasks", tiny_tasks / "tasks" / "tasks.yaml", "--task", "convex",
            "--config", tiny_tasks / "run.yaml", "--ema", bad, "--out", run)  # fmt: skip
    assert_one_line_error(r, "train.ema", "(0, 1)")
    assert not run.exists()


# -- logs -------------------------------------------------------------------------------------------


def jsonl_rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_csv_holds_every_number_of_metrics_jsonl(tmp_path):
    def evaluate_per_task(m):
        return {**evaluate(m), "per_task": {"t1": {"AP": 0.25}}}

    s = setup(tmp_path, epochs=3)
    s.train.eval_every = 2  # epoch 1 without validation: blank cells, not a shorter row
    Trainer(model(), Loss(), data(), collate, s, DistInfo(), evaluate_per_task).fit()
    rows = jsonl_rows(tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    assert list(table[0])[:5] == ["epoch", "lr", "steps", "loss_mse", "loss_l1"]
    assert {"total", "train_seconds", "AP", "AP50", "per_task/t1/AP"} <= set(table[0])
    for row, line in zip(table, rows):
        for key, value in line.items():
            if key == "per_task":
                assert float(row["per_task/t1/AP"]) == value["t1"]["AP"]
            else:
                assert float(row[key]) == value, key  # repr round-trips: the same float
    assert table[0]["AP"] == "" and float(table[1]["AP"]) == rows[1]["AP"]


def test_tensorboard_scalars_equal_metrics_jsonl_across_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(model(), Loss(), data(), collate, setup(tmp_path, epochs=2, tensorboard=True), DistInfo(), evaluate).fit()
    # A crash after epoch 2 was logged but before last.pt was written: resume from epoch 1's.
    keep = tmp_path / "keep.pt"
    Trainer(model(), Loss(), data(), collate, setup(tmp_path / "one", epochs=1), DistInfo(), evaluate).fit()
    (tmp_path / "one" / "last.pt").replace(keep)
    import shutil

    shutil.copy(keep, tmp_path / "last.pt")
    rows = jsonl_rows(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
    s = setup(tmp_path, epochs=3, tensorboard=True)
    Trainer(model(), Loss(), data(), collate, s, DistInfo(), evaluate).fit(resume=True)

    rows = jsonl_rows(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/total", "train/loss_mse", "train/loss_l1", "train/lr", "val/AP", "val/AP50"} <= tags
    for tag, key in [("train/total", "total"), ("train/loss_l1", "loss_l1"), ("train/lr", "lr"), ("val/AP", "AP")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag  # epoch 2 once: the resumed run's
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import kacli.engine.runlog as runlog
    from kacli.config import from_dict
    from kacli.engine.config import TrainConfig

    monkeypatch.setattr(runlog, "tensorboard_available", lambda: False)
    with pytest.raises(KacliError, match=r"'tensorboard'.*pip install 'kacli\[tensorboard\]'"):
        from_dict({"tensorboard": True}, TrainConfig, "run.yaml")
    assert from_dict({"tensorboard": False}, TrainConfig).tensorboard is False


def test_a_torn_last_line_of_metrics_jsonl_is_left_out_and_resume_drops_it(tmp_path):
    """metrics.jsonl is appended a whole line per epoch; a run killed while appending leaves a torn
    last line. Every reader leaves it out, and --resume rewrites the file without it."""
    from kacli.demo import run_finished, run_train_seconds
    from kacli.engine.runlog import read_jsonl, write_csv
    from kacli.report import read_metrics

    Trainer(model(), Loss(), data(), collate, setup(tmp_path, epochs=1), DistInfo(), evaluate).fit()
    log = tmp_path / "metrics.jsonl"
    whole = log.read_text()
    first = json.loads(whole)
    log.write_text(whole + '{"epoch": 2, "lr": 0.05, "loss_m')  # killed in the middle of epoch 2's line
    assert [rec for _, _, rec in read_jsonl(log)] == [first]
    assert read_metrics(log) == [first]
    assert run_train_seconds(tmp_path) == first["train_seconds"] and run_finished(tmp_path, 1)
    with open(write_csv(log, tmp_path / "check.csv"), newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1]
    Trainer(model(), Loss(), data(), collate, setup(tmp_path, epochs=2), DistInfo(), evaluate).fit(resume=True)
    lines = log.read_text().splitlines()
    assert lines[0] == whole.rstrip("\n") and [json.loads(ln)["epoch"] for ln in lines] == [1, 2]
    # only the last line may be torn: a broken line elsewhere is an error naming it
    log.write_text('{"epoch": 1, "lr\n' + whole)
    with pytest.raises(KacliError, match="malformed JSON on line 1") as e:
        read_jsonl(log)
    assert e.value.path == str(log)


def test_ema_averages_float_tensors_and_copies_integer_buffers():
    """BatchNorm's running statistics are averaged like weights; its num_batches_tracked (int64)
    follows the model."""
    from kacli.engine.ema import WeightEMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(net, 0.5)
    states = []
    for _ in range(3):
        net(torch.randn(8, 3))  # train mode: running stats and num_batches_tracked move
        with torch.no_grad():
            net[0].weight.add_(0.1)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update(net)
    want = dict(states[0])  # the first update copies
    for n, w in enumerate(states[1:], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        want = {k: (d * want[k] + (1 - d) * w[k]) if w[k].is_floating_point() else w[k] for k in w}
    got = ema.module.state_dict()
    assert got["1.num_batches_tracked"].dtype == torch.int64 and int(got["1.num_batches_tracked"]) == 3
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
