"""MAC counting against hand-computed values, budgets and budget parsing."""

from __future__ import annotations

import pytest
import torch.nn as nn

from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count, parse_count
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.zoo import teacher_spec


@pytest.mark.parametrize(("module", "shape", "macs", "params"), [
    # dense 3x3 conv, 3->16 channels, 32x32 output: 3*16*9*32*32
    (nn.Conv2d(3, 16, 3, padding=1, bias=False), (3, 32, 32), 3 * 16 * 9 * 32 * 32, 3 * 16 * 9),
    # bias adds one MAC per output element
    (nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32), 3 * 16 * 9 * 32 * 32 + 16 * 32 * 32, 3 * 16 * 9 + 16),
    # stride 2 halves each output side: 16x16 outputs
    (nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), (8, 32, 32), 8 * 8 * 9 * 16 * 16, 8 * 8 * 9),
    # depthwise 5x5 on 32 channels at 14x14: one 5x5 filter per channel
    (nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False), (32, 14, 14), 32 * 25 * 14 * 14, 32 * 25),
    # grouped 3x3, 4 groups of 16->16
    (nn.Conv2d(64, 64, 3, padding=1, groups=4, bias=False), (64, 8, 8), 64 * 16 * 9 * 8 * 8, 64 * 16 * 9),
    # pointwise 1x1
    (nn.Conv2d(24, 144, 1, bias=False), (24, 7, 7), 24 * 144 * 49, 24 * 144),
    # linear layer: in*out MACs plus one per output for the bias
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (64, 1, 1), 64 * 10 + 10, 64 * 10 + 10),
    # BatchNorm and ReLU are free
    (nn.Sequential(nn.BatchNorm2d(16), nn.ReLU()), (16, 8, 8), 0, 32),
])
def test_macs_match_hand_computed_values(module: nn.Module, shape: tuple, macs: int, params: int) -> None:
    assert count(module, shape) == Cost(macs, params)


def test_cifar_resnet20_matches_the_literature() -> None:
    # ResNet-20 on 3x32x32: 40.81M MACs and 0.27M parameters (He et al. 2016; the NAS/KD literature)
    cost = count(build(teacher_spec("resnet20"), (3, 32, 32), 10, channels_last=False), (3, 32, 32))
    assert cost == Cost(40_813_194, 272_474)


def test_count_leaves_the_model_in_training_mode() -> None:
    model = build(teacher_spec("resnet8"), (1, 28, 28), 10)
    model.train()
    count(model, (1, 28, 28))
    assert model.training


@pytest.mark.parametrize(("text", "value"), [
    ("300K", 300_000), ("300k", 300_000), ("50M", 50_000_000), ("1.5G", 1_500_000_000), ("2.5e6", 2_500_000),
    ("12345", 12_345), (" 7M ", 7_000_000), (".5M", 500_000), ("1e3K", 1_000_000),
])
def test_parse_count_accepts(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["-5M", "abc", "50MB", "0", "0.4", "", "M", "inf", "nan", "1e400", "5 M B", "5T"])
def test_parse_count_refuses_with_a_useful_message(text: str) -> None:
    with pytest.raises(InputError, match=r"not a positive count.*K/M/G"):
        parse_count(text, "--flops-budget")


def test_format_count_is_decimal() -> None:
    assert [format_count(v) for v in (999, 1_000, 12_345_678, 2_500_000_000)] == ["999", "1K", "12.35M", "2.5G"]


def test_budget_violations_are_relative_excess() -> None:
    budget = Budget(macs=10_000_000, params=100_000)
    assert budget.violations(Cost(12_500_000, 50_000)) == {"macs": 0.25, "params": -0.5}
    assert not budget.fits(Cost(12_500_000, 50_000))
    assert budget.fits(Cost(10_000_000, 100_000))  # the bound itself fits
    assert Budget(params=1000).violations(Cost(10**9, 500)) == {"params": -0.5}
    assert str(budget) == "MACs <= 10M, params <= 100K"
