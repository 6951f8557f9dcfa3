"""What a network costs: MACs and parameters, and the counts budgets are written in.

MACs are multiply-accumulates of one forward pass of one input, counted by ptflops with its
`aten` backend pinned: it counts convolutions (depthwise and grouped included) and matrix
products (linear layers), each with one add per output element for a bias, and nothing else; BatchNorm, activations, pooling,
residual adds and the squeeze-excite multiply are free. This is the figure the NAS literature
calls "FLOPs" (CIFAR ResNet-20 at 3x32x32: 40.8M). Parameters are every trainable parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

MAC_BACKEND = "aten"


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int
    latency_ms: float | None = None  # one image on the target (nas_kd.device.latency); None = not known
    memory: int | None = None  # bytes of peak int8 activations (nas_kd.device.latency.peak_activations)


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
