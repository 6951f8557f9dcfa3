"""nas_kd.training.train's optimiser, schedule and loss guard on tiny models: which parameters decay, the
one-cycle factors step by step, and a non-finite loss stopping `fit` with its epoch named."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

from nas_kd.core.config import TrainConfig
from nas_kd.training.train import fit, make_optimizer, one_cycle


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


def steps_of_fit(epochs: int, replan, batches: int = 4, checkpoint=None) -> tuple[list[int], list[int]]:
    """The optimizer steps and the epochs of a `fit` of a tiny model."""
    model = nn.Linear(2, 1, bias=False)
    steps: list[int] = []
    epochs_seen: list[int] = []

    def step_loss(batch: int) -> torch.Tensor:
        return model.weight.pow(2).sum()

    fit(model, Batches(batches), step_loss, TrainConfig(warmup=0.25), epochs, on_epoch=epochs_seen.append,
        progress=False, on_step=steps.append, replan=replan, checkpoint=checkpoint)
    return steps, epochs_seen


@pytest.mark.parametrize(("planned", "asked", "trained"), [
    (2, [5, 5, 5, 5], 5),  # the machine was faster than planned: the schedule stretches to 5 epochs
    (6, [2], 2),  # slower: it ends after the next epoch
    (3, [1], 2),  # never fewer than one more epoch than done
    (3, [3, 3], 3),  # as planned
])
def test_a_replanned_fit_trains_the_epochs_asked_for(planned: int, asked: list[int], trained: int) -> None:
    calls: list[tuple[int, float]] = []

    def replan(done: int, seconds: float) -> int:
        calls.append((done, seconds))
        return asked[len(calls) - 1]

    steps, epochs = steps_of_fit(planned, replan)
    assert epochs == list(range(trained)) and len(steps) == 4 * trained
    assert [done for done, _ in calls] == list(range(1, trained))  # after each epoch but the last
    assert all(seconds >= 0 for _, seconds in calls)


@pytest.mark.parametrize("new_total", [14, 6])
def test_stretching_the_schedule_falls_from_where_it_is_to_the_new_end(new_total: int) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = one_cycle(optimizer, 8, 0.25)  # 2 rising steps, then a fall to 0 at step 8
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4 / 6)  # (8 - 4) / (8 - 2)
    scheduler.lr_lambdas[0].stretch(new_total, scheduler.last_epoch)
    lrs = []
    for _ in range(new_total - 4):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # no jump: a straight line from 4/6 at step 4 to 0 at the new end
    expected = [4 / 6 * (new_total - step) / (new_total - 4) for step in range(5, new_total + 1)]
    assert lrs == pytest.approx(expected, abs=1e-12) and lrs[-1] == 0.0


def test_stretching_during_the_rise_keeps_rising() -> None:
    from nas_kd.training.train import OneCycle

    factor = OneCycle(40, 0.25)  # 10 rising steps
    factor.stretch(80, 3)
    assert factor.rise == 10 and factor(3) == pytest.approx(4 / 10) and factor(10) == 1.0
    factor.stretch(8, 5)  # too short for the rise: it ends sooner, but not before step 5
    assert factor.rise == 6 and factor(5) == 1.0


def test_a_resumed_fit_keeps_its_replanned_length(tmp_path) -> None:
    from nas_kd.training.train import Checkpoint

    checkpoint = Checkpoint(tmp_path / "c.pt")

    class Killed(Exception):
        pass

    def replan_then_die(done: int, seconds: float) -> int:
        if done == 2:
            raise Killed
        return 6

    with pytest.raises(Killed):
        steps_of_fit(3, replan_then_die, checkpoint=checkpoint)
    steps, epochs = steps_of_fit(3, None, checkpoint=checkpoint)  # resumed: 6 epochs, as re-planned
    assert epochs == [1, 2, 3, 4, 5] and len(steps) == 4 * 5


def test_a_deadline_asks_for_the_epochs_that_end_nearest_it_and_at_least_one_more() -> None:
    from nas_kd.training.train import Deadline

    now = [100.0]
    deadline = Deadline(end=1000.0, now=lambda: now[0])
    assert deadline.epochs is None
    now[0] = 300.0
    assert deadline(2, 100.0) == 2 + 7  # 700 s left, 100 s an epoch
    assert deadline.epochs == 9
    now[0] = 401.0
    assert deadline(3, 100.0) == 3 + 6  # 599 s left: the nearest end is 6 epochs on, 1 s past it
    now[0] = 460.0
    assert deadline(3, 100.0) == 3 + 5  # 540 s left: 5 epochs, 40 s short, is nearer than 6
    now[0] = 990.0
    assert deadline(8, 100.0) == 9  # 10 s left: one more epoch, the least
    now[0] = 1200.0
    assert deadline(9, 100.0) == 10  # past the end: still one more
