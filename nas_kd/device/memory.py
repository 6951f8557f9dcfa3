"""What a student needs in memory: peak activations and weights, in bytes, and byte counts as
flags and reports write them.

Memory follows MCUNet (Lin et al., NeurIPS 2020): the peak activation memory is the most bytes
alive at any layer, its input plus its output plus every tensor a later layer still needs (a
residual block's input across the block, a main branch's output across its shortcut).
Element-wise operations (BatchNorm folded at export, activations, residual adds, SE gating)
work in place. Weights are stored with BatchNorm folded into its convolution: one bias per
output channel of every convolution and linear layer; int8 weights take a byte each and
their biases 4 (int32), per-channel scales not counted.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# ---------------------------------------------------------------- peak activations and weights


_CREATES = {"conv2d", "linear", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d",
            "adaptive_avg_pool2d", "cat"}  # everything else that reads activations works in place


class _Liveness(TorchFunctionMode):
    """Records, for every operation on activations, the buffer it reads and the one it creates."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.keep = [x]  # ids stay unique while the tensors live
        self.buffer_of = {id(x): 0}
        self.sizes = [x.numel()]
        self.events: list[tuple[int | None, list[int]]] = []  # (created buffer or None, buffers read)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        read = [self.buffer_of[id(t)] for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and id(t) in self.buffer_of]
        if not read or not isinstance(out, torch.Tensor):
            return out
        self.keep.append(out)
        if getattr(func, "__name__", "") in _CREATES:
            self.buffer_of[id(out)] = len(self.sizes)
            self.sizes.append(out.numel())
            self.events.append((len(self.sizes) - 1, read))
        else:
            self.buffer_of[id(out)] = max(read, key=lambda b: self.sizes[b])
            self.events.append((None, read))
        return out


def peak_activations(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Values alive at once at the peak of one forward pass of one input (MCUNet's definition).
    Counts depend on shapes only, so the pass runs where the model is, in any memory format; in
    eval mode, so no BatchNorm statistic moves (the model is left as it was, and not copied)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(1, *input_shape, device=tensor.device if tensor is not None else "cpu")
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), _Liveness(x) as trace:
            out = model.eval()(x)
    finally:
        for m, training in modes:
            m.training = training
    last = [0] * len(trace.sizes)
    for i, (_, read) in enumerate(trace.events):
        for b in read:
            last[b] = i
    last[trace.buffer_of[id(out)]] = len(trace.events)  # the output is read after the pass
    born = [-1] + [i for i, (b, _) in enumerate(trace.events) if b is not None]
    peak = trace.sizes[0]
    for i, (b, _) in enumerate(trace.events):
        if b is not None:
            peak = max(peak, sum(size for buf, size in enumerate(trace.sizes) if born[buf] < i <= last[buf])
                       + trace.sizes[b])
    return peak


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights, biases) of `model` with BatchNorm folded: every convolution and linear layer
    has a bias per output channel."""
    weights = biases = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weights += m.weight.numel()
            biases += m.weight.shape[0]
    return weights, biases


def memory_facts(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Bytes of peak activations and of weights, fp32 and int8."""
    peak = peak_activations(model, input_shape)
    weights, biases = weight_counts(model)
    return {"peak_memory_fp32": 4 * peak, "peak_memory_int8": peak,
            "weights_fp32": 4 * (weights + biases), "weights_int8": weights + 4 * biases}
