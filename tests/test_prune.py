"""L1-norm filter pruning: the weight surgery is exact, the criterion is Li et al.'s, budgets are met."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.device.memory import peak_activations
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Network, Spec, SqueezeExcite, build
from nas_kd.nets.cost import count
from nas_kd.pipeline.phases import budget_of
from nas_kd.retraining.baselines import check_prunable
from nas_kd.retraining.prune import STEPS, min_pruned_cost, prune, prune_to_budget, pruned_spec

SHAPE = (3, 16, 16)
CLASSES = 5
SPECS = {
    "resnet": "c8|basic_d2_w8_s1_k3_e1|basic_d2_w16_s2_k3_e1",
    "bottleneck": "c8|bottleneck_d2_w16_s1_k3_e4|bottleneck_d1_w32_s2_k3_e4",
    "inverted_se": "c8|inverted_d2_w8_s1_k3_e4_se|inverted_d2_w12_s2_k3_e2_se|h24",
    "vgg": "c8|conv_d2_w16_s1_k3_e1|conv_d1_w24_s2_k3_e1_se|conv_d2_w32_s2_k3_e1",
    # every block type; the first conv stage feeds a residual stage, so it keeps its width
    "mixed": "c8|conv_d1_w12_s1_k3_e1|basic_d2_w8_s1_k3_e1|bottleneck_d1_w16_s2_k3_e2|inverted_d2_w16_s1_k3_e4_se"
             "|dwsep_d1_w16_s1_k3_e1|conv_d2_w12_s2_k3_e1|h16",
}
# the conv_bn layers whose filters each block ranks and prunes
RANKED = {"basic": ["conv1"], "bottleneck": ["reduce", "conv"], "inverted": ["expand"], "conv": ["conv"], "dwsep": []}


def teacher(text: str) -> Network:
    """A network of `text` in eval mode with random BN weights, biases and running statistics, so no
    block is the identity map its zero-initialised last BN would make it."""
    net = build(Spec.parse(text), SHAPE, CLASSES)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def outputs(net: Network, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", list(SPECS))
def test_keep_one_reproduces_the_teacher(name: str) -> None:
    net = teacher(SPECS[name])
    pruned = prune(net, 1.0)
    assert pruned.spec == net.spec
    assert pruned is not net and not pruned.training
    x = torch.randn(3, *SHAPE)
    assert torch.allclose(outputs(pruned, x), outputs(net, x), atol=1e-5)


def silence_weakest(net: Network, keep: float) -> None:
    """Zero, in every layer that `prune(net, keep)` narrows, the filters it will drop (a random choice),
    and their BN scale and shift: those channels are then exactly 0 after the BN and ReLU, so dropping
    them must not change the network's outputs. Squeeze-excite hidden units that go (its hidden width
    follows its channels) are zeroed the same way, weights and bias."""
    student = build(pruned_spec(net.spec, keep), SHAPE, CLASSES)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for st, src_stage, dst_stage in zip(net.spec.stages, net.stages, student.stages):
            for src, dst in zip(src_stage, dst_stage):
                for layer in RANKED[st.block]:
                    conv, bn = getattr(src, layer)
                    n = conv.out_channels - getattr(dst, layer)[0].out_channels
                    dead = torch.randperm(conv.out_channels, generator=gen)[:n]
                    for t in (conv.weight, bn.weight, bn.bias):
                        t[dead] = 0
                    if st.block == "inverted":  # the depthwise BN would turn the zeros into a constant
                        src.depthwise[1].weight[dead] = 0
                        src.depthwise[1].bias[dead] = 0
                if isinstance(src.se, SqueezeExcite):
                    n = src.se.reduce.out_channels - dst.se.reduce.out_channels
                    dead = torch.randperm(src.se.reduce.out_channels, generator=gen)[:n]
                    src.se.reduce.weight[dead] = 0
                    src.se.reduce.bias[dead] = 0


@pytest.mark.parametrize("name", list(SPECS))
def test_dropping_silent_filters_keeps_the_outputs(name: str) -> None:
    net = teacher(SPECS[name])
    silence_weakest(net, 0.75)
    pruned = prune(net, 0.75)
    assert pruned.spec != net.spec
    assert count(pruned, SHAPE).macs < count(net, SHAPE).macs
    x = torch.randn(3, *SHAPE)
    assert torch.allclose(outputs(pruned, x), outputs(net, x), atol=1e-5)


def test_the_filters_of_largest_l1_norm_survive_in_their_order() -> None:
    net = teacher("c4|basic_d1_w6_s1_k3_e1")
    conv1, bn1 = net.stages[0][0].conv1
    # L1 norms 0.5, 4, 1, 3, 1.5, 4.5 (times 36 weights): filter 3 alternates in sign (its plain sum is 0)
    # and filter 1 is negative, so only the sum of |w| ranks 5, 1, 3 first; they stay in index order
    signs = torch.tensor([1.0, -1.0]).repeat(18).reshape(4, 3, 3)
    with torch.no_grad():
        for i, value in enumerate([0.5, -4.0, 1.0, 3.0, -1.5, 4.5]):
            conv1.weight[i] = value * (signs if i == 3 else 1)
    pruned = prune(net, 0.5)
    assert str(pruned.spec) == "c4|basic_d1_w6_s1_k3_e1_m3"
    kept = [1, 3, 5]
    new_conv1, new_bn1 = pruned.stages[0][0].conv1
    assert torch.equal(new_conv1.weight, conv1.weight[kept])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new_bn1, name), getattr(bn1, name)[kept])
    assert torch.equal(pruned.stages[0][0].conv2[0].weight, net.stages[0][0].conv2[0].weight[:, kept])
    assert torch.equal(pruned.stem[0][0].weight, net.stem[0][0].weight)  # everything else as it was


@pytest.mark.parametrize(("name", "fraction"), [("mixed", 0.9), ("mixed", 0.4), ("resnet", 0.2), ("vgg", 0.5)])
def test_the_largest_keep_that_fits_the_budget_is_found(name: str, fraction: float) -> None:
    net = teacher(SPECS[name])
    budget = Budget(macs=int(count(net, SHAPE).macs * fraction))
    pruned, keep, cost = prune_to_budget(net, SHAPE, budget)
    assert 0 < keep < 1
    assert cost == count(pruned, SHAPE)
    assert budget.fits(cost)
    assert not budget.fits(count(prune(net, min(1.0, keep + 2**-STEPS)), SHAPE))
    assert str(pruned.spec) == str(pruned_spec(net.spec, keep))


def test_a_params_budget_is_met_too() -> None:
    net = teacher(SPECS["vgg"])
    budget = Budget(params=count(net, SHAPE).params // 3)
    pruned, keep, cost = prune_to_budget(net, SHAPE, budget)
    assert budget.fits(cost) and cost.params > budget.params * 0.8  # close to it: pruning is fine-grained
    assert not budget.fits(count(prune(net, min(1.0, keep + 2**-STEPS)), SHAPE))


def test_a_budget_the_teacher_fits_returns_an_exact_copy() -> None:
    net = teacher(SPECS["resnet"])
    full = count(net, SHAPE)
    pruned, keep, cost = prune_to_budget(net, SHAPE, Budget(macs=full.macs, params=full.params))
    assert (keep, cost, pruned.spec) == (1.0, full, net.spec) and pruned is not net
    x = torch.randn(2, *SHAPE)
    assert torch.equal(outputs(pruned, x), outputs(net, x))


def test_an_unreachable_budget_is_refused() -> None:
    net = teacher(SPECS["mixed"])
    smallest = min_pruned_cost(net.spec, SHAPE, CLASSES)
    with pytest.raises(InputError) as e:
        prune_to_budget(net, SHAPE, Budget(macs=smallest.macs - 1))
    message = str(e.value)
    for part in (str(net.spec), format_count(smallest.macs), format_count(smallest.params),
                 f"MACs <= {format_count(smallest.macs - 1)}", "raise the budget or pick another teacher"):
        assert part in message, part
    _, _, cost = prune_to_budget(net, SHAPE, Budget(macs=smallest.macs))  # the smallest itself is reachable
    assert cost == smallest


def test_min_pruned_cost_is_the_cost_of_every_prunable_width_at_one() -> None:
    most_pruned = Spec.parse(
        "c8|conv_d1_w12_s1_k3_e1|basic_d2_w8_s1_k3_e1_m1|bottleneck_d1_w16_s2_k3_e2_m1|inverted_d2_w16_s1_k3_e4_m1_se"
        "|dwsep_d1_w16_s1_k3_e1|conv_d2_w1_s2_k3_e1|h16")
    expected = count(build(most_pruned, SHAPE, CLASSES), SHAPE)
    assert min_pruned_cost(Spec.parse(SPECS["mixed"]), SHAPE, CLASSES) == expected


def test_the_pruned_spec_string_rebuilds_the_pruned_network() -> None:
    pruned = prune(teacher(SPECS["mixed"]), 0.6)
    spec = Spec.parse(str(pruned.spec))
    assert spec == pruned.spec
    rebuilt = build(spec, SHAPE, CLASSES).eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: same names and shapes
    x = torch.randn(2, *SHAPE)
    assert torch.equal(outputs(rebuilt, x), outputs(pruned, x))


def test_pruned_network_is_channels_last_and_keeps_the_mode() -> None:
    net = teacher(SPECS["vgg"])
    assert not prune(net, 0.5).training
    pruned = prune(net.train(), 0.5)
    assert pruned.training
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in pruned.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_keep_outside_zero_one_is_refused(keep: float) -> None:
    with pytest.raises(InputError, match=re.escape(f"keep must be a fraction in (0, 1], got {keep}")):
        prune(teacher(SPECS["resnet"]), keep)


@pytest.mark.parametrize("name", list(SPECS))
def test_pruned_network_trains(name: str) -> None:
    pruned = prune(teacher(SPECS[name]), 0.5).train()
    before = [p.detach().clone() for p in pruned.parameters()]
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(pruned(torch.randn(4, *SHAPE)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    bad = [n for n, p in pruned.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and not bad, bad
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, pruned.parameters()))


def test_a_memory_budget_is_met_too() -> None:
    net = teacher(SPECS["inverted_se"])
    budget = Budget(memory=(peak_activations(net, SHAPE) + min_pruned_cost(net.spec, SHAPE, CLASSES, Budget(memory=1)).memory) // 2)
    pruned, keep, cost = prune_to_budget(net, SHAPE, budget)
    assert 0 < keep < 1 and cost.memory == peak_activations(pruned, SHAPE) <= budget.memory
    assert peak_activations(prune(net, min(1.0, keep + 2**-STEPS)), SHAPE) > budget.memory


@pytest.mark.parametrize("bounds", [{"flops_budget": 600_000}, {"flops_budget": 50_000_000, "memory_budget": 25_000}])
def test_a_pruned_baseline_the_budget_cannot_hold_is_refused_before_training(bounds: dict) -> None:
    """resnet8 at 1x28x28, most pruned: 667K MACs and 25.9K bytes of peak int8 activations; a
    memory bound below that is refused as a MACs bound below it is (it was not checked at all)."""
    budget = budget_of(SearchConfig(teachers=("resnet8",), **bounds))
    with pytest.raises(InputError, match="--pruned-baseline: the largest teacher resnet8 pruned") as e:
        check_prunable(["resnet8"], budget, (1, 28, 28), 10)
    assert ("memory 25.87K > 25K" if "memory_budget" in bounds else "macs 667K > 600K") in str(e.value)
    check_prunable(["resnet8"], Budget(macs=50_000_000, memory=26_000), (1, 28, 28), 10)
