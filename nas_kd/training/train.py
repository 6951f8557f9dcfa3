"""Training primitives shared by teachers and students: optimiser, schedule, loop, evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.core.progress import bars_shown, budget_status, log, tick
from nas_kd.data.batches import Batch, BatchIterator, eval_batches
from nas_kd.data.datasets import Dataset, Split
from nas_kd.nets.weights import move_aside


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    return torch.device(name)


def make_optimizer(params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.SGD:
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # BN weights and biases are 1-D
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


class OneCycle:
    """The one-cycle learning-rate factor of optimizer step n: a linear rise over the first
    `warmup` share of `total` steps, then a linear fall to 0 at `total`. A callable object, so
    that the scheduler's state (and a checkpoint) keeps it, and `stretch` can move its end while
    training: from the current step on, the factor falls linearly from its current value to 0 at
    the new end (no jump); during the rise, the rise goes on as it was (or, for a schedule too
    short for it, ends sooner, but not before the current step)."""

    def __init__(self, total: int, warmup: float):
        self.total, self.warmup = total, warmup
        self.rise = max(1, int(total * warmup))
        self.fall_from: tuple[int, float] | None = None  # (step, factor) where a stretched fall starts

    def __call__(self, step: int) -> float:
        if step < self.rise:
            return (step + 1) / self.rise
        if self.fall_from is not None and step >= self.fall_from[0]:
            start, factor = self.fall_from
            return max(0.0, factor * (self.total - step) / max(1, self.total - start))
        return max(0.0, (self.total - step) / max(1, self.total - self.rise))

    def stretch(self, total: int, step: int) -> None:
        """End the schedule at `total` steps instead, `step` steps having been taken."""
        if step < self.rise:
            self.rise = min(self.rise, max(step + 1, int(total * self.warmup)))
        else:
            self.fall_from = (step, self(step))
        self.total = total


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, OneCycle(total_steps, warmup))


class Deadline:
    """Re-plans a training's length after each epoch (`fit`'s `replan`): the whole epochs that end
    nearest to `end` (a time of `now`) at the mean epoch time measured so far, and at least one
    more, so that a machine that speeds up or slows down mid-training still ends near `end`, by
    half an epoch at most (more only when not even one epoch was left). Rounding down instead left
    up to a whole epoch unused: a 30-minute run ended 12% under its budget with 1.99 epochs' time
    left before its last re-plan. `epochs` is the last length asked for (None before the first
    epoch ends)."""

    def __init__(self, end: float, now: Callable[[], float] = time.perf_counter):
        self.end, self.now = end, now
        self.epochs: int | None = None

    def __call__(self, done: int, epoch_seconds: float) -> int:
        self.epochs = done + epochs_that_fit(self.end - self.now(), epoch_seconds)
        return self.epochs


def epochs_that_fit(seconds: float, epoch_seconds: float) -> int:
    """The one rule for a training's length in time: the whole epochs of `epoch_seconds` that end
    nearest to `seconds` from now, and at least one (rounding down left up to a whole epoch unused)."""
    return max(1, math.floor(seconds / max(epoch_seconds, 1e-9) + 0.5))


StepLoss = Callable[[Batch], torch.Tensor]


class Checkpoint:
    """Where `fit` saves its whole state after every epoch (model, optimizer, schedule, epoch),
    so that a killed run resumes where it stopped. Written atomically with `torch.save`, read with
    `weights_only=True`."""

    def __init__(self, path: Path, on_damage: Callable[[str], None] | None = None):
        self.path = path
        self.on_damage = on_damage  # given: a damaged file is moved aside, said in one line, and training starts anew

    KEYS = ("model", "optimizer", "scheduler", "epoch", "seconds")

    def load(self) -> dict[str, Any] | None:
        """The saved state (its `epochs` is the length the training had then), or None when there is
        none. A damaged file raises `InputError`, or with `on_damage` is moved aside and gives None."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged pickle raises almost any type (KeyError, UnpicklingError, EOFError...)
            return self._damaged(f"the file is damaged ({(str(e).splitlines() or [type(e).__name__])[0]})")
        if not isinstance(state, dict) or any(k not in state for k in self.KEYS):
            return self._damaged(f"not a training checkpoint of nas_kd (expected the keys {', '.join(self.KEYS)})")
        return state

    def _damaged(self, why: str) -> None:
        if self.on_damage is None:
            raise InputError(f"cannot resume from {self.path}: {why}; delete it to start this training anew")
        aside = move_aside(self.path)
        self.on_damage(f"warning: cannot resume from {self.path}: {why}; moved it to {aside}, training starts anew")
        return None

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def fit(modules: nn.Module, batches: BatchIterator, step_loss: StepLoss, cfg: TrainConfig, epochs: int,
        on_epoch: Callable[[int], None] | None = None, desc: str = "train", progress: bool = True,
        first_epoch: int = 0, checkpoint: Checkpoint | None = None,
        on_step: Callable[[int], None] | None = None, epoch_lines: bool = False,
        replan: Callable[[int, float], int] | None = None) -> float:
    """Train every parameter of `modules` (a model, or a model with its adapters) for `epochs`.

    `step_loss(batch)` returns the scalar loss of one batch; `on_epoch(epoch)` runs after each
    epoch (evaluation, reporting, pruning: it may raise). Epochs are numbered from `first_epoch`
    (for shuffling, views and `on_epoch`), so a second call can continue where a first stopped.
    With `checkpoint`, the state is saved after every epoch (before `on_epoch`) and a saved state
    is resumed from: the finished epochs are skipped, and because batches and augmentation are a
    function of (seed, epoch), the resumed run takes the same steps as an uninterrupted one.
    `on_step(n)` runs after the n-th optimizer step of this call (n from 1; sub-epoch evaluation
    and pruning: it may raise; its time is not counted as training).
    `replan(done, epoch_seconds)`, after each epoch but the last, returns the length the training
    should have now (at least `done` + 1; `Deadline`): the schedule's fall is redrawn to end there.
    With `cfg.bf16` the losses are computed under bfloat16 autocast. With `epoch_lines`, when
    no progress bar is drawn (`progress.bars_shown`), one line per epoch is logged instead.
    Returns the seconds spent training, evaluation callbacks excluded.
    """
    optimizer = make_optimizer(modules.named_parameters(), cfg)
    scheduler = one_cycle(optimizer, epochs * len(batches), cfg.warmup)
    seconds, start_epoch = 0.0, first_epoch
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        try:
            modules.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(f"cannot resume from {checkpoint.path}: it was saved by another model or schedule "
                             f"({str(e).splitlines()[0]}); delete it to start this training anew") from None
        seconds, start_epoch = state["seconds"], state["epoch"] + 1
    device_type = next(modules.parameters()).device.type
    lines = epoch_lines and not bars_shown(progress)
    step_count = (start_epoch - first_epoch) * len(batches)
    schedule: OneCycle = scheduler.lr_lambdas[0]  # type: ignore[assignment]
    if state is not None:  # the length the saved training had reached, re-planned or not
        epochs = max(1, round(schedule.total / max(1, len(batches))))
    epoch = start_epoch - 1
    while (epoch := epoch + 1) < first_epoch + epochs:
        modules.train()
        start = time.perf_counter()
        bar = tqdm(batches.epoch(epoch), total=len(batches), desc=f"{desc} {epoch - first_epoch + 1}/{epochs}",
                   leave=False, disable=not progress or None, dynamic_ncols=True)
        total = torch.zeros((), device=next(modules.parameters()).device)  # summed on the device: no sync a step
        for batch in bar:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = step_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
            if lines:  # the epoch's mean loss, only when it is logged
                total += loss.detach().float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_count += 1
            tick()
            if on_step is not None:
                paused = time.perf_counter()
                on_step(step_count)
                modules.train()
                start += time.perf_counter() - paused
        seconds += time.perf_counter() - start
        if lines:
            log(f"{desc} epoch {epoch - first_epoch + 1}/{epochs}: loss {total.item() / max(1, len(batches)):.4f}, "
                f"{time.perf_counter() - start:.0f} s{budget_status()}")
        if replan is not None and (done := epoch - first_epoch + 1) < epochs:
            wanted = max(done + 1, replan(done, seconds / done))
            if wanted != epochs:
                epochs = wanted
                schedule.stretch(epochs * len(batches), scheduler.last_epoch)
        if checkpoint is not None:
            checkpoint.save({"model": modules.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "epochs": epochs,
                             "seconds": seconds})
        if on_epoch is not None:
            on_epoch(epoch)
    return seconds


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance from `images` (batches of inputs),
    forward only; returns the number of BatchNorm layers reset.

    A briefly trained network's running statistics are an exponential average over weights that
    changed fast at a high learning rate, so they lag the final weights and its validation
    accuracy is read with stale statistics: trials of a 2-epoch schedule sat at chance after
    their first epoch. Resetting them and taking the cumulative average of each batch's
    statistics (momentum None) over a fixed set of training batches measures the network that
    was actually trained. This is the BN recalibration of one-shot NAS (Guo et al., "Single Path
    One-Shot Neural Architecture Search with Uniform Sampling", ECCV 2020). Each layer's running
    mean ends as the mean of its per-batch means, its running variance as the mean of its
    per-batch unbiased variances. The model is left in eval mode.
    """
    layers = _batch_norms(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen since the reset
    model.train()
    try:
        for x in images:
            model(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return len(layers)


@contextmanager
def recalibrated(model: nn.Module, images: Iterable[torch.Tensor]) -> Iterator[nn.Module]:
    """`recalibrate_bn` for the duration of the `with` block; the running statistics the model had
    are put back after it, so measuring a model mid-training leaves its training untouched."""
    layers = _batch_norms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    was_training = model.training
    recalibrate_bn(model, images)
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
        model.train(was_training)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.inference_mode()
def predict(model: nn.Module, split: Split, dataset: Dataset, batch_size: int | None = None) -> torch.Tensor:
    """Logits (N, num_classes) of the un-augmented split."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x).float() for x, _ in eval_batches(split, dataset, batch_size)])
    model.train(was_training)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def evaluate(model: nn.Module, split: Split, dataset: Dataset) -> float:
    """Top-1 accuracy in [0, 1] on the un-augmented split."""
    return accuracy(predict(model, split, dataset), split.y)
