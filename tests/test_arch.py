"""Blocks, specs and networks: every registered block and teacher, shapes, gradients, round-trips."""

from __future__ import annotations

import pytest
import torch

from nas_kd.core.errors import InputError
from nas_kd.nets.arch import BLOCKS, Network, Spec, StageSpec, build
from nas_kd.nets.zoo import TEACHERS, teacher_spec


def check_network(net: Network, shape: tuple[int, int, int], classes: int, batch: int = 3) -> None:
    """Logits of the right shape, finite, per-stage features, and a gradient for every parameter."""
    x = torch.randn(batch, *shape)
    features = net.forward_features(x)
    assert len(features) == len(net.spec.stages)
    assert [f.shape[1] for f in features] == net.stage_channels
    logits = net.forward_head(features[-1])
    assert logits.shape == (batch, classes)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("se", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_block(block: str, se: bool, stride: int) -> None:
    expand = 4 if BLOCKS[block].uses_expand else 1
    spec = Spec(8, (StageSpec(block, 2, 16, stride, 3, expand, se), StageSpec(block, 1, 24, 2, 5, expand, se)))
    net = build(spec, (3, 16, 16), 7)
    check_network(net, (3, 16, 16), 7)
    sizes = [f.shape[-1] for f in net.forward_features(torch.randn(1, 3, 16, 16))]
    assert sizes == [16 // stride, 16 // stride // 2]


@pytest.mark.parametrize("name", list(TEACHERS))
@pytest.mark.parametrize(("shape", "classes"), [((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_every_teacher_adapts_to_channels_size_and_classes(name: str, shape: tuple, classes: int) -> None:
    check_network(build(teacher_spec(name), shape, classes), shape, classes, batch=2)


@pytest.mark.parametrize("name", list(TEACHERS))
def test_teacher_specs_round_trip(name: str) -> None:
    spec = teacher_spec(name)
    assert Spec.parse(str(spec)) == spec
    assert Spec.from_json(spec.to_json()) == spec


def test_spec_string_form() -> None:
    spec = Spec(16, (StageSpec("basic", 3, 16), StageSpec("inverted", 2, 64, 2, 5, 6, True)), head=128)
    assert str(spec) == "c16|basic_d3_w16_s1_k3_e1|inverted_d2_w64_s2_k5_e6_se|h128"
    assert Spec.parse(str(spec)) == spec
    assert Spec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(("text", "message"), [
    ("", "bad spec"),
    ("c16", "bad spec"),
    ("x16|basic_d1_w8_s1_k3_e1", "bad spec"),
    ("c16|basic_d1_w8", "bad stage"),
    ("c16|warp_d1_w8_s1_k3_e1", "unknown block type 'warp'; known: basic"),
    ("c16|basic_d0_w8_s1_k3_e1", "depth must be >= 1"),
    ("c16|basic_d1_w8_s3_k3_e1", "stride must be 1 or 2"),
    ("c16|basic_d1_w8_s1_k4_e1", "kernel must be odd"),
    ("c16|basic_d1_w8_s1_k3_e6", "has no expansion ratio"),
    ("c16|basic_d1_w8_s1_k3_e1_se_m4", "bad stage"),  # mid comes before squeeze-excite
    ("c16|dwsep_d1_w8_s1_k3_e1_m4", "block 'dwsep' has no internal width; mid must be 0, got 4"),
    ("c16|conv_d1_w8_s1_k3_e1_m4", "block 'conv' has no internal width; mid must be 0, got 4"),
    ("c16|inverted_d1_w8_s1_k3_e1_m4", "block 'inverted' has no internal width at expand 1; mid must be 0, got 4"),
])
def test_bad_spec_strings(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Spec.parse(text)


def test_spec_string_form_with_mid() -> None:
    spec = Spec(16, (StageSpec("basic", 3, 16, 1, 3, 1, False, 9), StageSpec("bottleneck", 1, 32, 2, 3, 4, False, 5),
                     StageSpec("inverted", 2, 64, 2, 5, 6, True, 100)), head=128)
    text = "c16|basic_d3_w16_s1_k3_e1_m9|bottleneck_d1_w32_s2_k3_e4_m5|inverted_d2_w64_s2_k5_e6_m100_se|h128"
    assert str(spec) == text
    assert Spec.parse(text) == spec
    assert Spec.from_json(spec.to_json()) == spec


def test_spec_json_from_before_mid_still_loads() -> None:
    old = ('{"stem": 16, "stages": [{"block": "basic", "depth": 3, "width": 16, "stride": 1, "kernel": 3, '
           '"expand": 1, "se": false}], "head": 0}')
    assert Spec.from_json(old) == Spec.parse("c16|basic_d3_w16_s1_k3_e1")


def test_negative_mid_is_refused() -> None:
    with pytest.raises(InputError, match="mid must be >= 0, got -1"):
        StageSpec("basic", 1, 8, mid=-1)


def conv_widths(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(in_channels, out_channels) of every conv, in order."""
    return [(m.in_channels, m.out_channels) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize(("token", "first", "second"), [
    # basic: conv1 has mid filters, conv2 reads them; then the shortcut (8 -> 16 in the first block)
    ("basic_d2_w16_s2_k3_e1_m5", [(8, 5), (5, 16), (8, 16)], [(16, 5), (5, 16)]),
    # bottleneck: reduce and kxk conv at mid, restore back to the width
    ("bottleneck_d2_w16_s1_k3_e4_m3", [(8, 3), (3, 3), (3, 16), (8, 16)], [(16, 3), (3, 3), (3, 16)]),
    # inverted: mid is absolute, the same hidden width in the first block (8 * 6 by default) and the
    # second (16 * 6); squeeze-excite (hidden max(8, 10 // 4)) and the depthwise conv over mid channels
    ("inverted_d2_w16_s1_k3_e6_m10_se", [(8, 10), (10, 10), (10, 8), (8, 10), (10, 16)],
     [(16, 10), (10, 10), (10, 8), (8, 10), (10, 16)]),
])
def test_mid_sets_the_internal_width_of_every_block(token: str, first: list, second: list) -> None:
    net = build(Spec.parse(f"c8|{token}"), (3, 12, 12), 5)
    assert conv_widths(net.stages[0][0]) == first
    assert conv_widths(net.stages[0][1]) == second
    check_network(net, (3, 12, 12), 5, batch=2)


@pytest.mark.parametrize("block", [b for b, cls in BLOCKS.items() if cls.uses_mid])
def test_mid_zero_is_the_default_width(block: str) -> None:
    default = Spec(8, (StageSpec(block, 2, 16, 2, 3, 2 if BLOCKS[block].uses_expand else 1),))
    mid = BLOCKS[block].default_mid(16, 16, default.stages[0].expand)
    explicit = Spec(8, (StageSpec(block, 2, 16, 2, 3, default.stages[0].expand, mid=mid),))
    # the second block (input 16) is the same either way
    assert conv_widths(build(default, (3, 12, 12), 5).stages[0][1]) == conv_widths(build(explicit, (3, 12, 12), 5).stages[0][1])


def test_bad_spec_json() -> None:
    with pytest.raises(InputError, match="bad spec JSON"):
        Spec.from_json('{"stem": 16}')


def test_spec_that_downsamples_below_one_pixel_is_refused() -> None:
    spec = Spec(8, tuple(StageSpec("conv", 1, 8, 2) for _ in range(4)))
    with pytest.raises(InputError, match="below one pixel"):
        build(spec, (1, 8, 8), 10)


def test_residual_blocks_start_as_identity_maps() -> None:
    # zero-initialised last BN: a shape-keeping residual block passes ReLU(x) through at init
    block = BLOCKS["basic"](8, 8, 1, 3, 1, False).eval()
    x = torch.randn(2, 8, 6, 6).relu()
    assert torch.allclose(block(x), x)


def test_downsampling_shortcut_survives_the_onednn_crash_shape() -> None:
    # a strided 1x1 conv's backward in channels_last crashed (double free) for batch 3, 8 -> 16
    # channels at 16x16 on torch 2.14.1; the average-pool shortcut must not take that path
    net = build(Spec.parse("c8|basic_d1_w16_s2_k3_e1"), (3, 16, 16), 7)
    check_network(net, (3, 16, 16), 7, batch=3)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   for m in net.modules())
