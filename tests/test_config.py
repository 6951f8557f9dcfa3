"""Typed config: from_dict checks keys and types, parse_distill, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nas_kd.core.config import DistillConfig, SearchConfig, TrainConfig, from_dict, parse_distill
from nas_kd.core.errors import InputError


def test_empty_dict_is_the_defaults():
    assert from_dict(SearchConfig, {}) == SearchConfig()


def test_values_and_conversions():
    cfg = from_dict(SearchConfig, {
        "flops_budget": 12_000_000,
        "params_budget": None,
        "teachers": ["resnet8", "resnet20"],
        "teacher_ckpts": [["resnet20", "a.safetensors"], ("resnet8", "b.safetensors")],
        "timeout": 60,  # an int where a float is expected
        "subset": None,
        "retrain_trial": 3,
        "train": {"lr": 1, "batch_size": 128},
        "distill": {"losses": [["kl", 1], ["hint", 0.5]], "temperature": 2},
    })
    assert cfg.flops_budget == 12_000_000 and cfg.params_budget is None
    assert cfg.teachers == ("resnet8", "resnet20")
    assert cfg.teacher_ckpts == (("resnet20", "a.safetensors"), ("resnet8", "b.safetensors"))
    assert cfg.timeout == 60.0 and isinstance(cfg.timeout, float)
    assert cfg.subset is None and cfg.retrain_trial == 3
    # nested dicts build the nested dataclasses; keys left out keep their defaults
    assert cfg.train == TrainConfig(batch_size=128, lr=1.0)
    assert isinstance(cfg.train.lr, float)
    assert cfg.distill == DistillConfig(losses=(("kl", 1.0), ("hint", 0.5)), temperature=2.0)
    assert all(isinstance(w, float) for _, w in cfg.distill.losses)
    assert cfg.distill.weights() == {"kl": 1.0, "hint": 0.5}
    assert str(cfg.distill) == "kl=1,hint=0.5"
    # what from_dict gives is hashable and frozen, like the defaults
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trials = 3  # type: ignore[misc]


@pytest.mark.parametrize("data,key", [
    ({"trails": 5}, "'trails'"),
    ({"train": {"learning_rate": 0.1}}, "learning_rate"),
    ({"distill": {"temp": 2.0}}, "temp"),
])
def test_unknown_key(data, key):
    with pytest.raises(InputError, match="unknown config key") as e:
        from_dict(SearchConfig, data)
    message = str(e.value)
    assert key in message
    if "train" in data:
        assert "'train.learning_rate'" in message and "momentum" in message  # the path, and the keys it knows
    if "trails" in data:
        assert "trials" in message


@pytest.mark.parametrize("data,start", [
    ({"trials": "many"}, "trials: expected int, got 'many'"),
    ({"trials": 2.5}, "trials: expected int, got 2.5"),
    ({"trials": True}, "trials: expected int, got True"),
    ({"subset": "all"}, "subset: expected int, got 'all'"),
    ({"flops_budget": "12M"}, "flops_budget: expected int, got '12M'"),
    ({"timeout": "1h"}, "timeout: expected float, got '1h'"),
    ({"dataset": 5}, "dataset: expected str, got 5"),
    ({"data_dir": ["a"]}, "data_dir: expected str, got ['a']"),
    ({"teachers": 5}, "teachers: expected a list, got int"),
    ({"teachers": "resnet20"}, "teachers: expected a list, got str"),
    ({"teachers": ["resnet20", 8]}, "teachers: expected str, got 8"),
    ({"teacher_ckpts": [["resnet20"]]}, "teacher_ckpts: expected 2 items, got 1"),
    ({"train": "fast"}, "train: expected a mapping, got str"),
    ({"train": {"lr": "x"}}, "train.lr: expected float, got 'x'"),
    ({"train": {"augment": "yes"}}, "train.augment: expected bool, got 'yes'"),
    ({"train": {"batch_size": 256.0}}, "train.batch_size: expected int, got 256.0"),
    ({"distill": {"losses": [["kl", "high"]]}}, "distill.losses: expected float, got 'high'"),
    ({"distill": {"temperature": None}}, "distill.temperature: expected float, got None"),
    ({"seed": None}, "seed: expected int, got None"),
])
def test_wrong_type_names_the_key(data, start):
    with pytest.raises(InputError) as e:
        from_dict(SearchConfig, data)
    assert str(e.value) == start


def test_unknown_keys_of_mixed_types():
    """YAML keys need not be strings (`1: x`); naming them must not fail on sorting."""
    with pytest.raises(InputError, match="unknown config key"):
        from_dict(SearchConfig, {1: "x", "trails": 5})


def test_from_dict_on_nested_classes():
    assert from_dict(TrainConfig, {"warmup": 0}) == TrainConfig(warmup=0.0)
    with pytest.raises(InputError, match="unknown config key 'lr_max'"):
        from_dict(TrainConfig, {"lr_max": 1.0})


# ---------------------------------------------------------------- --distill


@pytest.mark.parametrize("text,expected", [
    ("kl,hint=0.5", (("kl", 1.0), ("hint", 0.5))),
    ("ce=1,kl=1,hint=1", (("ce", 1.0), ("kl", 1.0), ("hint", 1.0))),
    (" ce = 2 , kl ", (("ce", 2.0), ("kl", 1.0))),
    ("kl=0", (("kl", 0.0),)),
    ("kl=1e-3,", (("kl", 0.001),)),
])
def test_parse_distill(text, expected):
    assert parse_distill(text) == expected


@pytest.mark.parametrize("text,match", [
    ("kl=abc", r"weight of 'kl' must be a number, got 'abc'"),
    ("hint=-0.5", r"weight of 'hint' must be .*>= 0, got '-0.5'"),
    ("kl=nan", r"weight of 'kl' must be .*>= 0, got 'nan'"),
    ("kl=inf", r"weight of 'kl'"),  # an infinite weight makes every loss inf and every gradient NaN
    ("", r"needs at least one loss"),
    (" , ,", r"needs at least one loss"),
])
def test_parse_distill_bad(text, match):
    with pytest.raises(InputError, match=match):
        parse_distill(text)


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("cfg", [
    SearchConfig(),
    SearchConfig(flops_budget=5_000_000, params_budget=60_000, subset=None, timeout=30.5, storage="sqlite:///x.db",
                 teachers=("resnet8",), teacher_ckpts=(("resnet8", "t.safetensors"),), retrain_trial=0,
                 train=TrainConfig(lr=0.05, augment=False), distill=DistillConfig((("kl", 0.5),), 3.0)),
], ids=["defaults", "everything-set"])
def test_json_round_trip(cfg):
    back = from_dict(SearchConfig, json.loads(cfg.to_json()))
    assert back == cfg
    assert back.to_json() == cfg.to_json()
