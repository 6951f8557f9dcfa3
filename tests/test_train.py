"""nas_kd.train's optimiser, schedule and loss guard on tiny models: which parameters decay, the
one-cycle factors step by step, and a non-finite loss stopping `fit` with its epoch named."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

from nas_kd.config import TrainConfig
from nas_kd.train import fit, make_optimizer, one_cycle


def tiny_model() -> nn.Sequential:
    """conv (weight, bias) -> BN (weight, bias) -> linear (weight, bias), plus a frozen linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3), nn.Linear(3, 3))
    model[4].requires_grad_(False)
    return model


def test_weight_decay_only_on_conv_and_linear_weights() -> None:
    model = tiny_model()
    cfg = TrainConfig(lr=0.3, momentum=0.8, weight_decay=1e-3)
    optimizer = make_optimizer(model.named_parameters(), cfg)
    decay, no_decay = optimizer.param_groups
    # the frozen linear is in neither group; BN's weight and every bias are 1-D
    assert [id(p) for p in decay["params"]] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[3].bias)]
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.8, True)


@pytest.mark.parametrize(("total", "warmup", "factors"), [
    # 3 warm-up steps rise to the peak, the 7 after fall linearly to 0 at the end
    (10, 0.3, [1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0]),
    # int(4 * 0.1) = 0 warm-up steps: at least one
    (4, 0.1, [1, 1, 2 / 3, 1 / 3, 0]),
    (5, 0.5, [1 / 2, 1, 1, 2 / 3, 1 / 3, 0]),
    # 8 * 0.45 = 3.6: the warm-up is rounded down to 3 steps
    (8, 0.45, [1 / 3, 2 / 3, 1, 1, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0]),
])
def test_one_cycle_factors(total: int, warmup: float, factors: list[float]) -> None:
    """The learning rate of each step (before step 1, 2, ..., and after the last), peak 0.2."""
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.2)
    scheduler = one_cycle(optimizer, total, warmup)
    lrs = []
    for step in range(total + 1):
        first, second = (g["lr"] for g in optimizer.param_groups)
        assert first == second  # every group follows the same schedule
        lrs.append(first)
        if step < total:
            optimizer.step()
            scheduler.step()
    assert lrs == pytest.approx([0.2 * f for f in factors], abs=1e-12)


class Batches:
    """Stands in for data.BatchIterator: `n` batches an epoch, each batch its index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int) -> Iterator[int]:
        return iter(range(self.n))


@pytest.mark.parametrize(("bad", "first_epoch", "message"), [
    (float("nan"), 0, "tiny: loss became nan in epoch 2"),
    (float("inf"), 0, "tiny: loss became inf in epoch 2"),
    (float("-inf"), 3, "tiny: loss became -inf in epoch 5"),  # epochs numbered through the run
])
def test_fit_stops_on_a_non_finite_loss(bad: float, first_epoch: int, message: str) -> None:
    """Batch 1 of the second epoch gives a non-finite loss: `fit` raises before that step, so the
    weights keep the value of the three steps before it."""
    model = nn.Linear(2, 1, bias=False)
    steps: list[int] = []

    def step_loss(batch: int) -> torch.Tensor:
        loss = model.weight.pow(2).sum()
        return loss * bad if len(steps) == 3 else loss

    with pytest.raises(FloatingPointError, match=f"^{message}$"):
        fit(model, Batches(2), step_loss, TrainConfig(), 3, desc="tiny", progress=False, first_epoch=first_epoch,
            on_step=steps.append)
    assert steps == [1, 2, 3]
    assert torch.isfinite(model.weight).all() and model.weight.abs().sum() > 0
