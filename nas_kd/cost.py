"""What a network costs: MACs and parameters, and the counts budgets are written in.

MACs are multiply-accumulates of one forward pass of one input, counted by ptflops with its
`aten` backend pinned: it counts convolutions (depthwise and grouped included) and matrix
products (linear layers), each with one add per output element for a bias, and nothing else; BatchNorm, activations, pooling,
residual adds and the squeeze-excite multiply are free. This is the figure the NAS literature
calls "FLOPs" (CIFAR ResNet-20 at 3x32x32: 40.8M). Parameters are every trainable parameter.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from nas_kd.errors import InputError

MAC_BACKEND = "aten"


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int
    latency_ms: float | None = None  # one image on the target (nas_kd.latency); None = not known
    memory: int | None = None  # bytes of peak int8 activations (nas_kd.latency.peak_activations)


def count(model: nn.Module, input_shape: tuple[int, int, int]) -> Cost:
    """MACs and parameters of one forward pass of one (C, H, W) input."""
    # imported here: ptflops imports torchvision and with it torch._dynamo (2.5 s), which a
    # command that only checks its flags or refuses its input does not need
    from ptflops import get_model_complexity_info

    probe = copy.deepcopy(model).cpu()  # ptflops switches the model to eval mode and runs it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image through a small net: threads cost more than they save (5 ms vs 40+)
    try:
        macs, _ = get_model_complexity_info(probe, tuple(input_shape), as_strings=False, backend=MAC_BACKEND,
                                            print_per_layer_stat=False, verbose=False)
    finally:
        torch.set_num_threads(threads)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Cost(int(macs), int(params))


_COUNT = re.compile(r"^\s*(?P<num>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)\s*(?P<suffix>[kKmMgG]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str, what: str = "budget") -> int:
    """'300K', '50M', '1.5G', '2.5e6' -> an integer count (decimal suffixes: 1M = 1e6)."""
    m = _COUNT.match(str(text))
    value = float(m["num"]) * _SUFFIX[m["suffix"].lower()] if m else math.nan
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{what} {text!r} is not a positive count; use a number with an optional "
                         "K/M/G suffix (decimal), e.g. 300K, 50M, 1.5G or 2.5e6")
    return int(round(value))


def format_count(n: float, unit: str = "") -> str:
    """12_345_678 -> '12.35M', with `unit` after the suffix ('12.35MB'; decimal suffixes, as the
    budgets take them)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}{unit}"
    return f"{n:.4g}{unit}"
