"""Run configs: unknown keys and wrong types are errors, presets, CLI overrides, YAML round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from kacli.config import apply_overrides, config_to_dict, load_config, save_config
from kacli.data.transforms import AUG_PRESETS, AugConfig
from kacli.engine.config import TrainConfig
from kacli.errors import KacliError


@dataclass
class NetConfig:
    backbone: str = "resnet50"
    d_model: int = 256
    pre_norm: bool = False
    dropout: float = 0.1
    widths: tuple[int, ...] = (16, 32, 64, 128)
    kind: Literal["detr", "student"] = "detr"
    weights: Path | None = None


@dataclass
class RunConfig:
    model: NetConfig = field(default_factory=NetConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS = {
    "big": RunConfig(),
    "tiny": {
        "model": {"backbone": "tiny", "d_model": 64, "pre_norm": True, "dropout": 0},
        "aug": dataclasses.asdict(AUG_PRESETS["demo"]),
        "train": {"batch_size": 16, "lr": 5e-4, "epochs": 10, "lr_drop": 8},
    },
}


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_partial_file_keeps_defaults(tmp_path):
    p = write(tmp_path, "model:\n  d_model: 128\n  widths: [8, 16]\n  dropout: 0\ntrain:\n  lr: 2.0e-4\n")
    cfg = load_config(p, RunConfig, PRESETS)
    assert cfg.model.d_model == 128 and cfg.model.widths == (8, 16)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)  # int accepted for float
    assert cfg.train.lr == 2e-4 and cfg.train.epochs == TrainConfig().epochs
    assert cfg.aug == AugConfig() and cfg.model.backbone == "resnet50"


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(KacliError) as e:
        load_config(p, RunConfig, PRESETS)
    assert e.value.path == str(p)
    assert "'train.lrr'" in e.value.message and "unknown key" in e.value.message
    assert "lr_backbone" in e.value.message  # the known keys are listed
    with pytest.raises(KacliError, match="'optimizer'"):
        load_config({"optimizer": {}}, RunConfig, PRESETS)


@pytest.mark.parametrize(
    "data, key, problem",
    [
        ({"model": {"backbone": 50}}, "model.backbone", "not a string"),
        ({"model": {"d_model": "256"}}, "model.d_model", "not an integer"),
        ({"model": {"d_model": 2.5}}, "model.d_model", "not an integer"),
        ({"model": {"pre_norm": 1}}, "model.pre_norm", "not true/false"),
        ({"train": {"epochs": True}}, "train.epochs", "not an integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "not a number"),
        ({"model": {"widths": 16}}, "model.widths", "not a list"),
        ({"model": {"widths": [16, "x"]}}, "model.widths[1]", "not an integer"),
        ({"model": {"kind": "teacher"}}, "model.kind", "not one of"),
        ({"model": 3}, "model", "not a mapping"),
        ({"train": {"epochs": 0}}, "train.epochs", "at least 1"),
        ({"aug": {"flip_p": 1.5}}, "aug.flip_p", "probability"),
    ],
)
def test_wrong_types_and_values(data, key, problem):
    with pytest.raises(KacliError) as e:
        load_config(data, RunConfig, PRESETS)
    assert f"config key '{key}'" in e.value.message and problem in e.value.message, e.value.message


def test_types_converted():
    cfg = load_config({"model": {"weights": "w/r50.pth", "widths": [1, 2]}, "aug": {"scales": [100, 200]}}, RunConfig)
    assert cfg.model.weights == Path("w/r50.pth") and cfg.model.widths == (1, 2)
    assert cfg.aug.scales == (100, 200)
    assert load_config({"model": {"weights": None}}, RunConfig).model.weights is None


def test_presets_and_missing_source(tmp_path):
    tiny = load_config("tiny", RunConfig, PRESETS)
    assert tiny.model.d_model == 64 and tiny.aug == AUG_PRESETS["demo"] and tiny.train.lr == 5e-4
    big = load_config("big", RunConfig, PRESETS)
    assert big == RunConfig() and big is not PRESETS["big"]
    big.train.epochs = 1
    assert PRESETS["big"].train.epochs == TrainConfig().epochs  # presets are copied, never shared
    assert load_config(None, RunConfig, PRESETS) == RunConfig()
    with pytest.raises(KacliError, match="not a preset name .presets: big, tiny") as e:
        load_config("huge", RunConfig, PRESETS)
    assert e.value.path == "huge"
    bad = write(tmp_path, "model: [1, 2\n")
    with pytest.raises(KacliError, match="malformed YAML"):
        load_config(bad, RunConfig, PRESETS)
    lst = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(KacliError, match="must be a mapping"):
        load_config(lst, RunConfig, PRESETS)


def test_missing_required_field():
    @dataclass
    class Needs:
        name: str
        n: int = 1

    assert load_config({"name": "x"}, Needs).name == "x"
    with pytest.raises(KacliError, match="config key 'name': missing key"):
        load_config({"n": 2}, Needs)


def test_overrides():
    cfg = load_config("tiny", RunConfig, PRESETS)
    new = apply_overrides(cfg, {"train.epochs": 5, "train.batch_size": None, "model.dropout": 0, "aug.scales": [64, 96]})
    assert new.train.epochs == 5 and new.train.batch_size == 16  # None = flag not given
    assert new.model.dropout == 0.0 and new.aug.scales == (64, 96)
    assert cfg.train.epochs == 10  # the original is untouched
    with pytest.raises(KacliError, match="config key 'train.epoch'"):
        apply_overrides(cfg, {"train.epoch": 5})
    with pytest.raises(KacliError, match="config key 'train.device'.*must be auto"):
        apply_overrides(cfg, {"train.device": "tpu"})
    with pytest.raises(KacliError, match="config key 'train.epochs': 'five' is not an integer"):
        apply_overrides(cfg, {"train.epochs": "five"})
    with pytest.raises(KacliError, match="config key 'model.d_model.x'"):
        apply_overrides(cfg, {"model.d_model.x": 1})
    with pytest.raises(KacliError, match="config key 'aug.crop_min'"):
        apply_overrides(cfg, {"aug.crop_min": 1000})


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(
        load_config("tiny", RunConfig, PRESETS), {"model.weights": "/x/y.pth", "model.kind": "student", "train.amp": False}
    )
    d = config_to_dict(cfg)
    assert d["model"]["widths"] == [16, 32, 64, 128] and d["model"]["weights"] == "/x/y.pth"
    assert d["aug"]["scales"] == [64]  # AUG_PRESETS["demo"]: the 64-px demo images as they are
    out = tmp_path / "run" / "config.yaml"
    save_config(out, cfg)
    assert load_config(out, RunConfig, PRESETS) == cfg
    assert load_config(d, RunConfig) == cfg


def test_every_option_literal_is_its_tuple():
    """The amalgamation configuration's option types name exactly the options the code that reads
    them knows (the tuples the checks and the CLI help use)."""
    import typing

    from kacli.amalgamation.config import TRAINING_METHODS, AmalgamateConfig, SAConfig, TAConfig
    from kacli.losses.ground_truth import GT_LOSSES
    from kacli.losses.sequence import REDUCTIONS, SAG_INITS, STATS
    from kacli.models.compress import COMPRESSION_METHODS
    from kacli.models.student import PROJ_INITS

    tied = {
        (AmalgamateConfig, "method"): TRAINING_METHODS,
        (AmalgamateConfig, "gt_loss"): GT_LOSSES,
        (AmalgamateConfig, "compress"): COMPRESSION_METHODS,
        (AmalgamateConfig, "proj_init"): PROJ_INITS,
        (AmalgamateConfig, "sag_init"): SAG_INITS,
        (SAConfig, "stats"): STATS,
        (SAConfig, "reduction"): REDUCTIONS,
    }

    def literal_values(hint):
        if typing.get_origin(hint) is Literal:
            return typing.get_args(hint)
        found = [literal_values(a) for a in typing.get_args(hint)]  # X | None
        found = [f for f in found if f]
        return found[0] if found else ()

    seen = set()
    for cls in (AmalgamateConfig, SAConfig, TAConfig):
        for name, hint in typing.get_type_hints(cls).items():
            values = literal_values(hint)
            if values:
                assert (cls, name) in tied, f"{cls.__name__}.{name} is a Literal tied to no tuple"
                assert values == tuple(tied[cls, name]), (cls.__name__, name, values, tied[cls, name])
                seen.add((cls, name))
    assert seen == set(tied)
