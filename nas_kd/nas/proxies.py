"""Training-free scores of a student: computed from its freshly initialised network in about a
second, with no teacher and no training.

Zero-cost proxies are the cheapest trial scores a NAS can use. Surveys of them (Abdelfattah et
al., "Zero-Cost Proxies for Lightweight NAS", ICLR 2021; White et al., "A Deeper Look at
Zero-Cost Proxies for Lightweight NAS", ICLR blog track 2022) find that few beat the plain MAC
or parameter count, so the search offers those counts as scores too (`--trial-score macs`,
`params`) and `benchmarks/trial_scores.py` ranks every score against the counts.

Both proxies here are deterministic for a seed: the network is built under `torch.manual_seed`
and NASWOT reads a fixed batch of training images.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# the rectifiers whose on/off pattern NASWOT reads (every activation of nas_kd's students but SE's sigmoid)
RECTIFIERS = {F.relu, F.relu6, torch.relu, torch.relu_, F.hardtanh}


class _ActivationCodes(TorchFunctionMode):
    """Accumulates NASWOT's kernel from every rectifier called inside the `with` block, whether a
    module (nn.ReLU) or a functional call (F.relu) applied it."""

    def __init__(self, n: int, device: torch.device):
        super().__init__()
        self.kernel = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.units = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in RECTIFIERS and isinstance(out, torch.Tensor) and out.dim() > 1:
            c = (out.detach().flatten(1) > 0).to(torch.float32)  # (N, units) binary code of each image
            # K[i, j] += units where i and j agree = c_i . c_j + (1 - c_i) . (1 - c_j)
            #          = units - |c_i| - |c_j| + 2 c_i . c_j: one product of 0/1 codes, its sums whole
            # numbers that float32 holds exactly below 2^24 units, added to the float64 kernel
            active = c.sum(1).to(torch.float64)
            self.kernel += (2 * (c @ c.T)).to(torch.float64) + (c.shape[1] - active[:, None] - active[None, :])
            self.units += c.shape[1]
        return out


@torch.no_grad()
def naswot(model: nn.Module, images: torch.Tensor) -> float:
    """NASWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021): log |K_H|,
    where K_H[i, j] is the number of rectified units on which images i and j of a batch are both
    active or both inactive (N_A minus the Hamming distance of their binary activation codes) in
    the untrained network. A network that separates the images' codes well has a large
    determinant. `images` (N, C, H, W) is the paper's one mini-batch (N = 128 in the paper); BN
    runs in training mode, as in the paper, on a copy so `model` keeps its statistics.
    Singular kernels (two images with the same code) give -inf.
    """
    net = copy.deepcopy(model).train()
    codes = _ActivationCodes(images.shape[0], images.device)
    with codes:
        net(images)
    sign, logdet = torch.linalg.slogdet(codes.kernel)
    return float(logdet) if sign > 0 else float("-inf")


def synflow(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """SynFlow (Tanaka et al., "Pruning neural networks without any data by iteratively conserving
    synaptic flow", NeurIPS 2020), as the zero-cost NAS proxy of Abdelfattah et al. (ICLR 2021):
    S = sum over parameters of |theta * dR/dtheta|, where R is the sum of the outputs of the
    network with every parameter replaced by its absolute value, fed one all-ones input. Returned
    as ln S (S overflows float32 for deep nets; the ranking is the same). Computed on a float64
    copy with BatchNorm in eval mode: at initialisation that is the identity, which is how the
    proxy's authors drop BN for it.
    """
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=next(net.parameters()).device)
    net.zero_grad(set_to_none=True)
    net(x).sum().backward()
    total = sum(float((p.detach() * p.grad).abs().sum()) for p in net.parameters() if p.grad is not None)
    return math.log(total) if total > 0 else float("-inf")
