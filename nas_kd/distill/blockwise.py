"""Block-wise supervision: a cheap score of a student, stage by stage, against one teacher.

DNA (Li et al., "Block-wisely Supervised Neural Architecture Search with Knowledge Distillation",
CVPR 2020) splits the network into blocks and trains each candidate block alone to reproduce the
teacher's block: its input is the teacher's feature map before the block, its target the teacher's
map after it. A candidate block is then scored without training a whole network, and a block that
several architectures share is scored once. "Compact CNN Structure Learning by Knowledge
Distillation" (ICPR 2020) uses the same block-wise supervision to rank compact students; this
module is that side of it, used by the search as `--trial-score blockwise` beside the default
brief whole-network distillation.

Here a block is a stage of a `Spec`. Student stage i of S ends at teacher stage t(i) =
`match_stage(i, S, T)` (the same relative depth); it reads the teacher's output at t(i - 1) (the
teacher's stem output for i = 0) through a 1x1-conv+BN input adapter to the student's previous
width, and a 1x1-conv+BN output adapter maps its width to the teacher's at t(i). It is trained
with MSE to the teacher's map and scored by R^2 on held-out validation images: the fraction of
the teacher stage's output variance it reproduces. A spec's score is the mean over its stages.

What the score ignores: the student's stem (its width only sets stage 0's input width) and head,
and how errors compound from stage to stage (each stage reads the teacher's features, not the
student's). With S > T several student stages end at the same teacher stage; the later ones then
learn a map from that teacher stage to itself.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import Batch, BatchIterator, eval_batches, forward_batch, seeded_subset
from nas_kd.data.datasets import Dataset
from nas_kd.distill.losses import adapter, align, match_stage
from nas_kd.nets.arch import Network, Spec
from nas_kd.teaching.cache import Teacher
from nas_kd.training.train import fit, recalibrate_bn

STEM = -1  # the teacher "stage" whose output is the stem's, in stage maps


def stage_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Per student stage, (teacher stage whose output is its input, teacher stage whose output is
    its target); `STEM` (-1) names the teacher's stem."""
    ends = [match_stage(i, n_student, n_teacher) for i in range(n_student)]
    return [(STEM if i == 0 else ends[i - 1], ends[i]) for i in range(n_student)]


def most_accurate(members: list[Teacher]) -> Teacher:
    """The teacher a block-wise search supervises with: the ensemble's best on validation."""
    return max(members, key=lambda t: t.val_acc)


def stage_key(spec: Spec, i: int) -> str:
    """What determines a stage's score, readable: '<i>/<S>|c<input width>|<stage token>'."""
    cin = spec.stem if i == 0 else spec.stages[i - 1].width
    return f"{i}/{len(spec.stages)}|c{cin}|{spec.stages[i].token()}"


_KEY = re.compile(r"^(\d+)/(\d+)\|c(\d+)\|[a-z0-9_]+$")


class StageNet(nn.Module):
    """Input adapter -> one student stage -> output adapter, with the teacher stages it reads and
    regresses: (B, C_teacher[source], H, W) -> (B, C_teacher[target], H / stride, W / stride)."""

    def __init__(self, stage: nn.Module, adapt_in: nn.Module, adapt_out: nn.Module, source: int, target: int):
        super().__init__()
        self.adapt_in = adapt_in
        self.stage = stage
        self.adapt_out = adapt_out
        self.source = source  # teacher stage (STEM = -1) whose output is the input
        self.target = target  # teacher stage whose output is regressed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt_out(self.stage(self.adapt_in(x)))


class BlockwiseScorer:
    """Scores specs stage by stage against one teacher; built once per search.

    On construction the teacher runs once over the training positions of `batches` and over
    `val_images` validation images (a subset of `dataset.val` fixed by `seed`), un-augmented, and
    its stem output and every stage's output are kept in float16: the inputs and targets of every
    stage of every student. Memory is `nbytes`: per image 2 bytes times the elements of the stem
    and stage maps; for ResNet-20 on Fashion-MNIST (16x28x28 + 16x28x28 + 32x14x14 + 64x7x7 =
    34,496 elements, 69 KB an image) and the defaults (4000 training + 1000 validation images)
    345 MB; for CIFAR's 32x32 images 450 MB.

    Only the positions and the shuffling of `batches` are used (the teacher saw view 0 of each
    image), so the trial subset's iterator serves whatever its views. Stage scores are memoised
    in `scores` under `stage_key`; the memo is only valid for this teacher, data, schedule and
    seed, which is what `preload` assumes of the scores it is given.
    """

    def __init__(self, teacher: Teacher, dataset: Dataset, batches: BatchIterator, cfg: TrainConfig, epochs: int,
                 seed: int, val_images: int = 1000, chunk: int | None = None, progress: bool = False,
                 recalibration: int = 0):
        if epochs < 0:
            raise InputError(f"block-wise epochs must be >= 0, got {epochs}")
        if val_images < 1:
            raise InputError(f"block-wise validation images must be >= 1, got {val_images}")
        self.teacher = teacher.model.eval()
        self.dataset = dataset
        self.batches = batches
        self.cfg = cfg
        self.epochs = epochs
        self.seed = seed
        self.progress = progress
        self.device = next(self.teacher.parameters()).device
        chunk = chunk or forward_batch(self.device)
        self.channels_last = batches.normalize.channels_last
        # teacher widths of STEM, stage 0, ..., stage T-1: index with `source + 1`
        self.widths = [self.teacher.spec.stem, *self.teacher.stage_channels]
        positions = batches.indices
        self.slot = batches.rows()  # position in the split -> row of the training cache (-1: not cached)
        self.train_maps = self._teacher_maps(batches.images(positions[s: s + chunk], 0)
                                             for s in range(0, len(positions), chunk))
        val = dataset.val.subset(seeded_subset(len(dataset.val), val_images, seed).to(dataset.val.y.device))
        self.val_maps = self._teacher_maps(x for x, _ in eval_batches(val, dataset, chunk, self.channels_last))
        # rows of the training cache whose teacher maps re-estimate a stage's BatchNorm statistics
        # before it is scored (train.recalibrate_bn): `recalibration` seeded batches; none = off
        g = torch.Generator().manual_seed(seed + 1)
        rows = torch.randperm(len(positions), generator=g)[:recalibration * cfg.batch_size]
        self.calibration_rows = [rows[s: s + cfg.batch_size].to(self.device) for s in range(0, len(rows), cfg.batch_size)]
        self.scores: dict[str, float] = {}
        self.trained = 0  # stages trained and scored (memo hits and preloads excluded)
        self.cost_seconds = 0.0  # wall-clock seconds of training and scoring those stages

    @torch.no_grad()
    def _teacher_maps(self, chunks: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher's stem and stage outputs over all chunks of images: [(N, C_k, H_k, W_k)]
        float16, index 0 the stem, k + 1 stage k."""
        parts: list[list[torch.Tensor]] = []
        for x in chunks:
            h = self.teacher.stem(x.to(self.device))
            maps = [h]
            for stage in self.teacher.stages:
                h = stage(h)
                maps.append(h)
            parts.append([m.to(torch.float16).contiguous() for m in maps])
        return [torch.cat(level) for level in zip(*parts)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.train_maps, *self.val_maps))

    # ------------------------------------------------------------ one stage

    def stage_net(self, spec: Spec, i: int) -> StageNet:
        """Student stage i of `spec` with its adapters, initialised from `self.seed` alone, so a
        stage's score never depends on which spec asked for it first."""
        source, target = stage_map(len(spec.stages), len(self.widths) - 1)[i]
        cin = spec.stem if i == 0 else spec.stages[i - 1].width
        st = spec.stages[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            # a one-stage Network builds the stage's blocks and initialises them exactly as the
            # student's would be; its stem (cin channels) and classifier are dropped
            stage = Network(Spec(cin, (st,)), 1, 1).stages[0]
            net = StageNet(stage, adapter(self.widths[source + 1], cin), adapter(st.width, self.widths[target + 1]),
                           source, target)
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def recalibrate(self, net: StageNet) -> None:
        """`net`'s BatchNorm statistics re-estimated on the calibration batches (`train.recalibrate_bn`)."""
        recalibrate_bn(net, (self._input(self.train_maps, net, rows) for rows in self.calibration_rows))

    def _input(self, maps: list[torch.Tensor], net: StageNet, rows: torch.Tensor | slice) -> torch.Tensor:
        x = maps[net.source + 1][rows].float()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_stage(self, net: StageNet, desc: str = "block") -> float:
        """`self.epochs` epochs of MSE to the teacher's target map (one-cycle SGD of `self.cfg`);
        returns the seconds spent. Raises FloatingPointError if the loss diverges."""
        def step(batch: Batch) -> torch.Tensor:
            rows = self.slot[batch.index].to(self.device)  # (B,) rows of the training cache
            pred, target = align(net(self._input(self.train_maps, net, rows)),
                                 self.train_maps[net.target + 1][rows].float())
            return F.mse_loss(pred, target)

        if self.epochs == 0:
            return 0.0
        return fit(net, self.batches, step, self.cfg, self.epochs, desc=desc, progress=self.progress)

    @torch.no_grad()
    def r2(self, net: StageNet, chunk: int = 250) -> float:
        """R^2 = 1 - MSE(prediction, target) / Var(target) on the validation images, the variance
        over every element of the target after alignment: 1 reproduces the teacher stage, 0 is
        as good as its mean, below 0 worse."""
        was_training = net.training
        net.eval()
        sse = total = total_sq = 0.0
        n = 0
        for s in range(0, len(self.val_maps[0]), chunk):
            rows = slice(s, s + chunk)
            pred, target = align(net(self._input(self.val_maps, net, rows)),
                                 self.val_maps[net.target + 1][rows].float())
            target = target.double()  # sums of ~1e7 squares: float32 would lose digits
            sse += (pred.double() - target).pow(2).sum().item()
            total += target.sum().item()
            total_sq += target.pow(2).sum().item()
            n += target.numel()
        net.train(was_training)
        variance = max(total_sq / n - (total / n) ** 2, 1e-12)  # a dead teacher map has none
        return 1.0 - sse / n / variance

    # ------------------------------------------------------------ specs

    def score(self, spec: Spec) -> tuple[float, list[float]]:
        """(mean of the stages' R^2, per-stage R^2): stages already scored are looked up."""
        per_stage = []
        for i in range(len(spec.stages)):
            key = stage_key(spec, i)
            if key not in self.scores:
                start = time.perf_counter()
                net = self.stage_net(spec, i)
                self.train_stage(net, desc=f"block {key}")
                if self.calibration_rows:
                    self.recalibrate(net)
                self.scores[key] = self.r2(net)
                self.trained += 1
                self.cost_seconds += time.perf_counter() - start
            per_stage.append(self.scores[key])
        return sum(per_stage) / len(per_stage), per_stage

    def preload(self, scores: dict[str, float]) -> None:
        """Add stage scores from earlier trials (a resumed study's user attributes); keys as
        `stage_key`, values finite floats. Scores already here are kept."""
        for key, value in scores.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise InputError(f"bad block-wise stage key {key!r}: expected '<i>/<stages>|c<width>|<stage>', "
                                 "e.g. '0/3|c16|basic_d3_w16_s1_k3_e1'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"block-wise score of {key!r} must be a finite number, got {value!r}")
            self.scores.setdefault(key, float(value))
