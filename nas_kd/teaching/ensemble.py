"""The offline ensemble of trained teachers and its targets: soft targets, member weights, and
the teachers' outputs run live on every batch or cached once for every (image, view).

The ensemble's soft targets are the *mean of the members' temperature-softened probabilities*,
mean_m softmax(z_m / T); its prediction is the argmax of that mean at T = 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.data.batches import Batch, BatchIterator, forward_batch
from nas_kd.data.datasets import Dataset, Split
from nas_kd.nets.cost import Cost
from nas_kd.teaching.cache import Teacher, load_or_train
from nas_kd.teaching.files import load_file_teacher
from nas_kd.training.train import accuracy, predict

# Which teacher feature maps a recipe needs: none, each member's deepest stage, or every stage.
FeatureSet = Literal["last", "all"] | None


FEATURE_SETS: tuple[FeatureSet, ...] = (None, "last", "all")  # each holds the ones before it


def merge_feature_sets(sets: list[FeatureSet]) -> FeatureSet:
    """The smallest feature set that holds every one of `sets`."""
    return max(sets, key=FEATURE_SETS.index, default=None)


@dataclass(frozen=True)
class Targets:
    """What the teachers say about one batch of B images."""

    logits: torch.Tensor  # (M, B, num_classes), one row per ensemble member
    # per member that exposes feature maps (`feature_members`), per stage shallow to deep,
    # (B, C, H, W): every stage, or only the deepest one (then each inner list has one map); index
    # [-1] is the deepest either way
    features: list[list[torch.Tensor]] | None
    weights: torch.Tensor | None = None  # (M,) member weights summing to 1; None = equal
    feature_members: tuple[int, ...] | None = None  # the members `features` are of; None = every member


def member_weights(targets: Targets) -> torch.Tensor:
    m = targets.logits.shape[0]
    if targets.weights is None:
        return torch.full((m,), 1.0 / m, device=targets.logits.device)
    return targets.weights.to(targets.logits.device)


def feature_weights(targets: Targets) -> torch.Tensor:
    """The weights of the members whose feature maps `targets.features` holds, summing to 1."""
    weights = member_weights(targets)
    if targets.feature_members is None:
        return weights
    chosen = weights[list(targets.feature_members)]
    return chosen / chosen.sum()


def member_device(model: torch.nn.Module) -> torch.device:
    """Where a member runs: its first parameter's or buffer's device (a file teacher has only buffers)."""
    return next(itertools.chain(model.parameters(), model.buffers())).device


def soft_targets(logits: torch.Tensor, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(M, B, K) member logits -> (B, K) weighted mean of the members' softened probabilities
    (equal weights when `weights` is None)."""
    probs = F.softmax(logits / temperature, dim=-1)
    if weights is None:
        return probs.mean(0)
    return torch.einsum("m,mbk->bk", weights.to(probs), probs)


def _equal_weights(accuracies: torch.Tensor) -> torch.Tensor:
    return torch.full_like(accuracies, 1.0 / len(accuracies))


def _accuracy_weights(accuracies: torch.Tensor) -> torch.Tensor:
    return accuracies / accuracies.sum()


# How members' outputs are combined (the APSIPA 2021 offline ensemble weighs members by accuracy).
ENSEMBLE_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _equal_weights,
    "val_acc": _accuracy_weights,  # proportional to each member's validation accuracy
}


def check_weighting(weighting: str) -> None:
    if weighting not in ENSEMBLE_WEIGHTINGS:
        raise InputError(f"unknown ensemble weighting {weighting!r}; known: {', '.join(ENSEMBLE_WEIGHTINGS)}")


class Ensemble:
    """An offline ensemble of trained teachers, combined by `weighting` (see ENSEMBLE_WEIGHTINGS)."""

    def __init__(self, members: list[Teacher], weighting: str = "mean"):
        if not members:
            raise InputError("the teacher ensemble is empty; pass --teachers, e.g. --teachers resnet20")
        check_weighting(weighting)
        self.members = members
        self.weighting = weighting
        # the members that expose feature maps (the zoo's networks); a file teacher gives logits only
        self.feature_members = tuple(i for i, t in enumerate(members) if hasattr(t.model, "forward_features"))
        device = member_device(members[0].model)
        accuracies = torch.tensor([max(t.val_acc, 1e-6) for t in members], dtype=torch.float32, device=device)
        self.weights = ENSEMBLE_WEIGHTINGS[weighting](accuracies)  # (M,)
        for t in members:
            t.model.eval().requires_grad_(False)

    @property
    def feature_channels(self) -> list[list[int]]:
        """Per member that exposes feature maps (`feature_members`), the widths of its stages, shallow to deep."""
        return [list(self.members[i].model.stage_channels) for i in self.feature_members]

    def largest_member(self) -> Teacher:
        """The member of most MACs: the reference named for compression in MACs, and the teacher the
        pruned baseline prunes."""
        return max(self.members, key=lambda t: t.cost.macs)

    def compression_reference(self) -> Cost:
        """The reference for compression ratios: the most MACs of any member and the most params of
        any member (of two members when the one of most MACs is not the one of most params)."""
        return Cost(max(t.cost.macs for t in self.members), max(t.cost.params for t in self.members))

    @torch.no_grad()  # not inference_mode: live targets enter the student's autograd graph
    def __call__(self, x: torch.Tensor, features: FeatureSet = "last") -> Targets:
        logits, feats = [], []
        for i, t in enumerate(self.members):
            if i not in self.feature_members:
                logits.append(t.model(x).float())
                continue
            stages = t.model.forward_features(x)
            logits.append(t.model.forward_head(stages[-1]).float())
            feats.append([f.float() for f in (stages if features == "all" else stages[-1:])])
        return Targets(torch.stack(logits), feats if features else None, self.weights, self.feature_members)

    def accuracy(self, split: Split, dataset: Dataset) -> float:
        """Accuracy of the weighted mean of the members' probabilities (their stored logits for the
        val split)."""
        logits = torch.stack([t.val_logits if split is dataset.val and t.val_logits is not None
                              else predict(t.model, split, dataset) for t in self.members])
        return accuracy(soft_targets(logits, 1.0, self.weights), split.y)


class TargetSource(Protocol):
    def __call__(self, batch: Batch) -> Targets: ...


class LiveTargets:
    """Runs the teachers on every batch: any augmentation, at the cost of their forward passes."""

    def __init__(self, ensemble: Ensemble, features: FeatureSet):
        self.ensemble = ensemble
        self.features = features

    def __call__(self, batch: Batch) -> Targets:
        return self.ensemble(batch.x, self.features)


class CachedTargets:
    """The teachers' outputs for every (image, view) of a `BatchIterator`, computed once.

    Logits are kept in float32 (V, M, N, K); feature maps, when asked for (the deepest stage of
    each member, or every stage), in float16 (V, N, C, H, W) per member and stage, N being the
    iterator's positions. A trial then looks its targets up by (view, position) and never runs a
    teacher; because view v of image i is the same pixels every time (see `data`), the cached
    targets are exactly what the teachers would say about the augmented batch. Any iterator over
    the same split, views and seed can use the cache for the positions it covers (a trial subset
    of the retrain's whole split, say).
    """

    def __init__(self, ensemble: Ensemble, batches: BatchIterator, features: FeatureSet, chunk: int | None = None,
                 progress: bool = True):
        from tqdm.auto import tqdm

        positions, views = batches.indices, batches.views
        if views is None:
            raise ValueError("CachedTargets needs a BatchIterator with a fixed number of views")
        self.slot = batches.rows()  # position in the split -> row of the cache (-1: not cached)
        self.views = views
        self.weights = ensemble.weights
        self.feature_members = ensemble.feature_members
        self.feature_set = features
        n = len(positions)
        self.logits: torch.Tensor | None = None
        self.features: list[list[torch.Tensor]] | None = None
        chunk = chunk or forward_batch(positions.device)
        steps = [(v, s) for v in range(views) for s in range(0, n, chunk)]
        for v, start in tqdm(steps, desc="ensemble targets", leave=False, disable=not progress or None):
            rows = torch.arange(start, min(n, start + chunk), device=positions.device)
            out = ensemble(batches.images(positions[rows], v), features)
            if self.logits is None:
                self.logits = torch.empty((views, out.logits.shape[0], n, out.logits.shape[-1]),
                                          device=out.logits.device)
                if features:
                    self.features = [[torch.empty((views, n, *f.shape[1:]), dtype=torch.float16, device=f.device)
                                      for f in member] for member in out.features]
            self.logits[v, :, rows] = out.logits
            if features:
                for stores, member in zip(self.features, out.features):
                    for store, f in zip(stores, member):
                        store[v, rows] = f.half()

    @classmethod
    def of(cls, ensemble: Ensemble, batches: BatchIterator, features: FeatureSet, logits: torch.Tensor,
           feature_maps: list[list[torch.Tensor]] | None) -> CachedTargets:
        """The targets an earlier computation left (`teaching.stored`), without running a teacher."""
        targets = cls.__new__(cls)
        targets.slot, targets.views = batches.rows(), batches.views
        targets.weights, targets.feature_members = ensemble.weights, ensemble.feature_members
        targets.feature_set, targets.logits, targets.features = features, logits, feature_maps
        return targets

    @staticmethod
    def fits(ensemble: Ensemble, input_shape: tuple[int, int, int], positions: int, views: int, features: FeatureSet,
             limit_gb: float) -> bool:
        """Whether a cache of `positions` images x `views` stays within `limit_gb` (1 GB = 1e9 bytes);
        its size is measured on one image."""
        device = member_device(ensemble.members[0].model)
        out = ensemble(torch.zeros(1, *input_shape, device=device), features)
        per_image = out.logits.numel() * 4
        if features:
            per_image += sum(f.numel() * 2 for member in out.features for f in member)
        return per_image * positions * views <= limit_gb * 1e9

    def nbytes(self) -> int:
        total = self.logits.numel() * 4 if self.logits is not None else 0
        return total + sum(f.numel() * 2 for member in self.features or [] for f in member)

    def covers(self, positions: torch.Tensor) -> bool:
        return bool((self.slot[positions.to(self.slot.device)] >= 0).all())

    def serves(self, features: FeatureSet) -> bool:
        """Whether the cache holds the feature maps a recipe needing `features` reads."""
        return FEATURE_SETS.index(self.feature_set) >= FEATURE_SETS.index(features)

    def __call__(self, batch: Batch) -> Targets:
        rows = self.slot[batch.index]
        if (rows < 0).any():
            raise RuntimeError("batch holds images whose targets were not cached")
        view = batch.view % self.views
        logits = self.logits[view][:, rows]
        feats = [[f[view][rows].float() for f in member] for member in self.features] if self.features else None
        return Targets(logits, feats, self.weights, self.feature_members)


def ensemble_summary(ensemble: Ensemble) -> list[dict[str, float | str | int]]:
    return [{"name": t.name, "macs": t.cost.macs, "params": t.cost.params, "val_acc": t.val_acc,
             "source": t.source, "path": t.path, "weights_sha256": t.digest} for t in ensemble.members]


def teacher_names(cfg: SearchConfig) -> list[str]:
    """The ensemble's members in order: cfg.teachers, then any teacher given only by --teacher-ckpt."""
    return list(cfg.teachers) + [a for a, _ in cfg.teacher_ckpts if a not in cfg.teachers]


def file_teachers(cfg: SearchConfig, dataset: Dataset) -> list[Teacher]:
    """The teachers of cfg.teacher_files (`--teacher PATH`), each checked on the data (`files`)."""
    device = dataset.train.x.device
    return [load_file_teacher(path, dataset, device, cfg.teacher_input) for path in cfg.teacher_files]


def ensemble_from_config(cfg: SearchConfig, dataset: Dataset, progress: bool = True,
                         log: Callable[[str], None] = print, files: list[Teacher] | None = None) -> Ensemble:
    """The ensemble of cfg.teachers plus any teacher given only by --teacher-ckpt (member i is
    trained, if not cached, with seed cfg.seed + i), then the teachers from files (`files`, already
    loaded, or loaded here from cfg.teacher_files)."""
    ckpts = dict(cfg.teacher_ckpts)
    members = []
    for i, name in enumerate(teacher_names(cfg)):
        path = Path(ckpts[name]) if name in ckpts else None
        t = load_or_train(name, dataset, cfg.teacher_epochs, cfg.seed + i, cfg.train, cfg.cache_path(),
                          dataset.train.x.device, path, progress, log, cfg.shipped_teachers, cfg.teacher_min_gain)
        log(f"teacher {name}: {format_count(t.cost.macs)} MACs, {format_count(t.cost.params)} params, "
            f"val acc {t.val_acc:.4f} ({t.source}: {t.path})")
        members.append(t)
    for t in file_teachers(cfg, dataset) if files is None else files:
        log(f"teacher {t.name}: {format_count(t.cost.macs)} MACs, {format_count(t.cost.params)} params, "
            f"val acc {t.val_acc:.4f} ({t.source}: {t.path}; logits only)")
        members.append(t)
    return Ensemble(members, cfg.distill.ensemble_weighting)
