"""L1-norm filter pruning of a teacher into a smaller student that keeps the surviving weights.

The student of "Knowledge Distillation Based on Pruned Model" (Liu et al., 2020) is the teacher
with filters removed, then distilled from the teachers instead of fine-tuned. Filters are ranked by
the criterion of "Pruning Filters for Efficient ConvNets" (Li et al., ICLR 2017): the sum of the
absolute values of a filter's weights; the smallest go, each layer ranked on its own.

What is pruned is the internal width of each stage (`StageSpec.mid`: conv1 of basic blocks, the
reduce and kxk convs of bottlenecks, the hidden width of inverted residuals) and the width of VGG
`conv` stages, all to round(keep * width); block outputs that feed residual sums, the stem and the
head keep their width, so the pruned network is still a `Spec` and its string names it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn

from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.device.memory import peak_activations
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import (
    BLOCKS,
    BasicBlock,
    Block,
    Bottleneck,
    DepthwiseSeparable,
    InvertedResidual,
    Network,
    PlainConv,
    Spec,
    SqueezeExcite,
    StageSpec,
    build,
)
from nas_kd.nets.cost import Cost, count

STEPS = 14  # bisection steps on keep: to within 2**-14 (6e-5), under half a filter in layers narrower than 8192

Index = torch.Tensor | None  # kept channel indices, ascending; None = all of them
Cut = tuple[Index, Index]  # (kept input channels, kept output filters) of one conv_bn, conv or linear layer


# ---------------------------------------------------------------- widths: spec -> pruned spec


def _shrink(width: int, keep: float) -> int:
    return max(1, round(keep * width))


def _prune_mid(st: StageSpec, cin: int, keep: float) -> StageSpec:
    """One `mid` for every block of the stage. The first block's default can differ from the others'
    (inverted: cin * expand), so the stage is pruned from the smallest, which every block can reach by
    dropping filters. A stage where keep would drop no filter of any block is left as it was, so keep 1
    gives the teacher's spec."""
    cls = BLOCKS[st.block]
    inputs = (cin, st.width) if st.depth > 1 else (cin,)
    widths = {st.mid} if st.mid else {cls.default_mid(c, st.width, st.expand) for c in inputs}
    if 0 in widths:  # no internal width (an inverted block without expansion)
        return st
    mid = _shrink(min(widths), keep)
    return st if all(_shrink(w, keep) == w for w in widths) else replace(st, mid=mid)


def _prune_width(st: StageSpec, cin: int, keep: float) -> StageSpec:
    return replace(st, width=_shrink(st.width, keep))


def _unpruned(st: StageSpec, cin: int, keep: float) -> StageSpec:
    return st


# ---------------------------------------------------------------- weights: teacher block -> pruned block


def _strongest(conv: nn.Conv2d, n: int) -> Index:
    """Li et al.'s criterion: the n filters with the largest sum of |weights|, in their original order."""
    if n == conv.out_channels:
        return None
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))  # (out_channels,)
    return norms.topk(n).indices.sort().values


def _se_cuts(src: nn.Module, dst: nn.Module, kept: Index) -> dict[str, Cut]:
    """A squeeze-excite over the kept channels; its own hidden units (max(8, channels // 4)) shrink with
    them, ranked by the same criterion."""
    if not isinstance(src, SqueezeExcite):
        return {}
    hidden = _strongest(src.reduce, dst.reduce.out_channels)
    return {"se.reduce": (kept, hidden), "se.expand": (hidden, kept)}


Surgery = Callable[[Block, Block, Index], tuple[dict[str, Cut], Index]]
# (teacher block, pruned block, kept input channels) -> (cuts by submodule name, kept output channels)


def _basic(src: BasicBlock, dst: BasicBlock, kept_in: Index) -> tuple[dict[str, Cut], Index]:
    mid = _strongest(src.conv1[0], dst.conv1[0].out_channels)
    return {"conv1": (None, mid), "conv2": (mid, None)}, None


def _bottleneck(src: Bottleneck, dst: Bottleneck, kept_in: Index) -> tuple[dict[str, Cut], Index]:
    reduce = _strongest(src.reduce[0], dst.reduce[0].out_channels)
    conv = _strongest(src.conv[0], dst.conv[0].out_channels)
    return {"reduce": (None, reduce), "conv": (reduce, conv), "restore": (conv, None)}, None


def _inverted(src: InvertedResidual, dst: InvertedResidual, kept_in: Index) -> tuple[dict[str, Cut], Index]:
    if isinstance(src.expand, nn.Identity):
        return {}, None
    hidden = _strongest(src.expand[0], dst.expand[0].out_channels)
    # the depthwise conv has one (1, k, k) filter per hidden channel: its input channels go with its outputs
    return {"expand": (None, hidden), "depthwise": (None, hidden), **_se_cuts(src.se, dst.se, hidden),
            "project": (hidden, None)}, None


def _plain(src: PlainConv, dst: PlainConv, kept_in: Index) -> tuple[dict[str, Cut], Index]:
    kept = _strongest(src.conv[0], dst.conv[0].out_channels)
    return {"conv": (kept_in, kept), **_se_cuts(src.se, dst.se, kept)}, kept


def _nothing(src: Block, dst: Block, kept_in: Index) -> tuple[dict[str, Cut], Index]:
    return {}, None


class Rule(NamedTuple):
    stage: Callable[[StageSpec, int, float], StageSpec]  # (teacher stage, its input channels, keep) -> pruned
    surgery: Surgery
    narrow_input: bool  # whether the block can read a pruned input (residual blocks cannot: their shortcut)


RULES: dict[type[Block], Rule] = {
    BasicBlock: Rule(_prune_mid, _basic, False),
    Bottleneck: Rule(_prune_mid, _bottleneck, False),
    InvertedResidual: Rule(_prune_mid, _inverted, False),
    DepthwiseSeparable: Rule(_unpruned, _nothing, False),
    PlainConv: Rule(_prune_width, _plain, True),
}


# ---------------------------------------------------------------- public


def pruned_spec(spec: Spec, keep: float) -> Spec:
    """The spec of `spec` pruned to `keep` of its prunable widths (keep 0: every one of them is 1)."""
    stages, cin = [], spec.stem
    for i, st in enumerate(spec.stages):
        new = RULES[BLOCKS[st.block]].stage(st, cin, keep)
        following = spec.stages[i + 1:i + 2]
        if following and not RULES[BLOCKS[following[0].block]].narrow_input:
            new = replace(new, width=st.width)  # e.g. a conv stage before a residual stage keeps its outputs
        stages.append(new)
        cin = st.width
    return Spec(spec.stem, tuple(stages), spec.head)


def prune(model: Network, keep: float) -> Network:
    """`model` with the filters of lowest L1 norm removed, `keep` (0, 1] of each prunable width kept; every
    surviving weight and BN statistic is the teacher's. Same device and mode as `model`, channels_last."""
    if not 0 < keep <= 1:
        raise InputError(f"keep must be a fraction in (0, 1], got {keep}")
    spec = pruned_spec(model.spec, keep)
    param = next(model.parameters())
    net = Network(spec, model.stem[0][0].in_channels, model.classifier.out_features)
    net = net.to(device=param.device, dtype=param.dtype, memory_format=torch.channels_last)
    cuts: dict[str, Cut] = {}
    kept: Index = None  # output channels of the previous block that survived
    for i, (src_stage, dst_stage) in enumerate(zip(model.stages, net.stages)):
        for j, (src, dst) in enumerate(zip(src_stage, dst_stage)):
            rule = RULES[type(src)]
            assert kept is None or rule.narrow_input, "pruned_spec narrows only inputs that can be narrowed"
            block_cuts, kept = rule.surgery(src, dst, kept)
            cuts |= {f"stages.{i}.{j}.{name}": cut for name, cut in block_cuts.items()}
    cuts["head.0" if spec.head else "classifier"] = (kept, None)
    net.load_state_dict(_cut_state(model.state_dict(), cuts))
    return net.train(model.training)


def _cut_state(state: dict[str, torch.Tensor], cuts: dict[str, Cut]) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict, those under a cut module sliced: dim 0 (output filters; the only dim of
    biases and BN entries) by its kept outputs, dim 1 (input channels of conv and linear weights) by its
    kept inputs. Scalars (BN's num_batches_tracked) are copied as they are."""
    out = {}
    for key, t in state.items():
        kept_in, kept_out = next((c for name, c in cuts.items() if key.startswith(name + ".")), (None, None))
        if t.dim() >= 1 and kept_out is not None:
            t = t.index_select(0, kept_out)
        if t.dim() >= 2 and kept_in is not None:
            t = t.index_select(1, kept_in)
        out[key] = t
    return out


def _most_pruned_keep(spec: Spec) -> float:
    """A keep small enough that every prunable width rounds to 1: keep * width < 0.5 for the widest
    internal width there can be (input width times expansion)."""
    widest = max(spec.stem, *(max(st.width, st.mid) for st in spec.stages)) * max(st.expand for st in spec.stages)
    return 0.25 / widest


def priced(model: Network, input_shape: tuple[int, int, int], budget: Budget,
           latency: Callable[[Spec], float] | None = None) -> Cost:
    """`model`'s MACs and params, with the figures of `budget`'s other bounds: its peak int8
    activation memory when the budget bounds memory, and its latency when it bounds latency and
    `latency` (spec -> ms, `latency.latency_meter`) is given."""
    cost = count(model, input_shape)
    if budget.memory is not None:
        cost = replace(cost, memory=peak_activations(model, input_shape))
    if budget.latency_ms is not None and latency is not None:
        cost = replace(cost, latency_ms=latency(model.spec))
    return cost


def min_pruned_cost(spec: Spec, input_shape: tuple[int, int, int], num_classes: int, budget: Budget | None = None,
                    latency: Callable[[Spec], float] | None = None) -> Cost:
    """The cost (`priced` against `budget`; MACs and params alone without one) of the most-pruned
    version of `spec` (every prunable width 1): no budget below it is reachable."""
    return priced(build(pruned_spec(spec, _most_pruned_keep(spec)), input_shape, num_classes), input_shape,
                  budget or Budget(), latency)


def prune_to_budget(model: Network, input_shape: tuple[int, int, int], budget: Budget,
                    latency: Callable[[Spec], float] | None = None) -> tuple[Network, float, Cost]:
    """The pruned `model` with the largest keep whose cost (`priced`) fits `budget`, that keep, and the cost.

    Cost only grows with keep, so keep is bisected on pruned specs (no weights) and the weights are cut once."""
    full = priced(model, input_shape, budget, latency)
    if budget.fits(full):
        return copy.deepcopy(model), 1.0, full
    classes = model.classifier.out_features
    lo, hi = _most_pruned_keep(model.spec), 1.0  # lo fits (checked next), hi does not
    smallest = min_pruned_cost(model.spec, input_shape, classes, budget, latency)
    if not budget.fits(smallest):
        raise InputError(f"teacher {model.spec} cannot be pruned into the budget ({budget}) for {input_shape} "
                         f"inputs: even with every prunable width at 1 it needs {format_count(smallest.macs)} MACs "
                         f"and {format_count(smallest.params)} params ({budget.excess(smallest)}); raise the budget "
                         "or pick another teacher")
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        cost = priced(build(pruned_spec(model.spec, mid), input_shape, classes), input_shape, budget, latency)
        lo, hi = (mid, hi) if budget.fits(cost) else (lo, mid)
    pruned = prune(model, lo)
    return pruned, lo, priced(pruned, input_shape, budget, latency)
