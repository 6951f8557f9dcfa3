"""Batches of a dataset held as tensors: shuffled, normalised, augmented on whole batches (padding
crop and flip, seeded by epoch and view), and the evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nas_kd.data.datasets import Augment, Dataset, Split


def augment_params(n: int, augment: Augment, view: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (dy, dx, flip) of one view; view 0 is the identity."""
    if view == 0 or (augment.pad == 0 and not augment.flip):
        zeros = torch.zeros(n, dtype=torch.int64)
        return zeros, zeros, torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed * 1_000_003 + view)
    dy = torch.randint(-augment.pad, augment.pad + 1, (n,), generator=g)
    dx = torch.randint(-augment.pad, augment.pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if augment.flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flip


def shift_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Translate each image of x (B, C, H, W) by (dy, dx) with zero fill, then flip where asked."""
    b, _, h, w = x.shape
    pad = int(max(dy.abs().max(), dx.abs().max())) if b else 0
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = torch.arange(h, device=x.device)[None, :] + (pad + dy.to(x.device))[:, None]  # (B, H)
        cols = torch.arange(w, device=x.device)[None, :] + (pad + dx.to(x.device))[:, None]  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = flip.to(x.device)
    if flip.any():
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class Normalizer:
    """uint8 (B, C, H, W) -> float32 normalised, in channels_last when asked."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 channels_last: bool = True):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (B, C, H, W) float32, normalised and augmented
    y: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) positions in the split, to look up cached targets
    view: int  # which augmented view of each image x is


class BatchIterator:
    """Shuffled, augmented full batches of a split, or of the positions `indices` of it (one batch
    of all when there are fewer than a batch). `Batch.index` holds positions in the whole split,
    so a trial on a subset and the retrain on everything look up the same cached targets.

    With `views=V`, epoch e shows view e % V of every image (view 0 un-augmented), so the
    teachers' outputs for those V views can be cached. With `views=None` every epoch is a fresh
    augmented view (e + 1), for training against live teachers or labels alone.
    """

    def __init__(self, split: Split, dataset: Dataset, batch_size: int, seed: int,
                 views: int | None = None, augment: bool = True, channels_last: bool = True,
                 indices: torch.Tensor | None = None):
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 or None, got {views}")
        self.split = split
        self.indices = (torch.arange(len(split)) if indices is None else indices.cpu()).to(split.x.device)
        self.batch_size = batch_size
        self.seed = seed
        self.views = views
        self.augment = dataset.augment if augment else Augment(0, False)
        self.normalize = Normalizer(dataset.mean, dataset.std, split.x.device, channels_last)
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return max(1, len(self.indices) // self.batch_size)

    def view_of(self, epoch: int) -> int:
        return epoch + 1 if self.views is None else epoch % self.views

    def params(self, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if view not in self._params:
            self._params[view] = augment_params(len(self.split), self.augment, view, self.seed)
        return self._params[view]

    def rows(self) -> torch.Tensor:
        """Position in the whole split -> its row among `indices` (-1 where not among them): how a
        cache built over this iterator's positions is read with `Batch.index`."""
        rows = torch.full((len(self.split),), -1, dtype=torch.long, device=self.indices.device)
        rows[self.indices] = torch.arange(len(self.indices), device=self.indices.device)
        return rows

    def images(self, index: torch.Tensor, view: int) -> torch.Tensor:
        """The normalised pixels of `view` of the images at `index`."""
        dy, dx, flip = (p[index.cpu()] for p in self.params(view))
        return self.normalize(shift_flip(self.split.x[index], dy, dx, flip))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=g).to(self.indices.device)]
        view = self.view_of(epoch)
        # full batches only (the ragged rest differs every epoch): a batch of one would break
        # BatchNorm, and odd small batches hit a oneDNN crash (see arch.shortcut)
        size = min(self.batch_size, len(order))
        for start in range(0, len(order) - size + 1, size):
            index = order[start: start + size]
            yield Batch(self.images(index, view), self.split.y[index], index, view)


def forward_batch(device: torch.device) -> int:
    """Images per batch of a forward-only pass (evaluation, teacher targets): 64 on a CPU, where
    batches of 1000 were 1.7-4x slower for every model measured (their activations fall out of
    the cache; benchmarks/eval_batch.py), 1000 on a GPU."""
    return 1000 if device.type == "cuda" else 64


def eval_batches(split: Split, dataset: Dataset, batch_size: int | None = None,
                 channels_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented batches in order, for evaluation (`forward_batch` images each by default)."""
    batch_size = batch_size or forward_batch(split.x.device)
    normalize = Normalizer(dataset.mean, dataset.std, split.x.device, channels_last)
    for start in range(0, len(split), batch_size):
        yield normalize(split.x[start: start + batch_size]), split.y[start: start + batch_size]


def seeded_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    """`n` of `n_total` positions drawn with `seed` (all of them when n is None or too big)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_total, generator=g)[:n]).values
