"""Registry of distillation losses.

Each loss is a small module with the paper named in its docstring and one call shape,
`loss(student, targets, labels) -> scalar`, where `student` holds the student's logits and
per-stage features and `targets` the teachers' (see `teachers.Targets`). Losses with trainable
parts (adapters) are built per student, from its stage widths and the teachers' widths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.teaching.ensemble import Ensemble, FeatureSet, Targets, feature_weights, merge_feature_sets, soft_targets


@dataclass(frozen=True)
class StudentOutput:
    logits: torch.Tensor  # (B, K)
    features: list[torch.Tensor]  # per stage, shallow to deep: (B, C_i, H_i, W_i)


class Loss(nn.Module):
    """One distillation loss. Built per student from its stage widths and, per ensemble member,
    that member's stage widths (shallow to deep), so adapters can be sized."""

    uses_teachers = True  # False: needs only the labels
    features: FeatureSet = None  # which teacher feature maps it reads: None, "last" or "all"
    # "logits" or "features": in two-stage training, stage one trains the student on the feature
    # losses only and stage two on the logit losses only (see distill.distill)
    kind = "logits"

    def __init__(self, student_channels: list[int], teacher_channels: list[list[int]], temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


LOSSES: dict[str, type[Loss]] = {}


def register_loss(name: str) -> Callable[[type[Loss]], type[Loss]]:
    def wrap(cls: type[Loss]) -> type[Loss]:
        LOSSES[name] = cls
        return cls

    return wrap


def loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise InputError(f"unknown distillation loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def match_stage(i: int, n_from: int, n_to: int) -> int:
    """The stage of a network of `n_to` stages at the same relative depth as stage i of `n_from`
    stages: the one whose output ends the same fraction of the network."""
    return min(n_to - 1, max(0, round((i + 1) * n_to / n_from) - 1))


def weighted_mean(values: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Per-member scalar losses -> their mean under the ensemble's member weights (M,)."""
    return (torch.stack(values) * weights.to(values[0])).sum()


def align(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's spatial size."""
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        student = F.adaptive_avg_pool2d(student, ht)
    elif ht[0] * ht[1] > hs[0] * hs[1]:
        teacher = F.adaptive_avg_pool2d(teacher, hs)
    return student, teacher


def adapter(cin: int, cout: int) -> nn.Sequential:
    """A 1x1 conv + BN mapping student channels to a teacher's (FitNets' regressor)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


@register_loss("ce")
class CrossEntropy(Loss):
    """Cross-entropy with the hard labels."""

    uses_teachers = False

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.logits, labels)


@register_loss("kl")
class SoftTargetKL(Loss):
    """KL(ensemble || student) on temperature-softened outputs, scaled by T^2 so its gradients keep
    their size as T changes (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015). The ensemble's distribution is the (weighted) mean of its members' softened
    ones: the offline ensemble of the APSIPA 2021 cross-layer KD paper."""

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        p_teacher = soft_targets(targets.logits, t, targets.weights)  # (B, K)
        log_p_student = F.log_softmax(student.logits / t, dim=-1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


@register_loss("hint")
class Hint(Loss):
    """FitNets hint (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the student's
    deepest stage, mapped by a 1x1-conv adapter per teacher to that teacher's width, regresses
    the teacher's deepest stage (MSE), spatial sizes aligned by average pooling; averaged over
    the ensemble's members with their weights."""

    features = "last"
    kind = "features"

    def __init__(self, student_channels: list[int], teacher_channels: list[list[int]], temperature: float):
        super().__init__(student_channels, teacher_channels, temperature)
        self.adapters = nn.ModuleList(adapter(student_channels[-1], stages[-1]) for stages in teacher_channels)

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for adapt, member in zip(self.adapters, targets.features):
            s, t = align(adapt(student.features[-1]), member[-1])
            losses.append(F.mse_loss(s, t))
        return weighted_mean(losses, feature_weights(targets))


def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FSP / Gram matrix between two layers (Yim et al., "A Gift from Knowledge Distillation",
    CVPR 2017): (B, Cx, H, W), (B, Cy, H', W') -> (B, Cx, Cy), the larger map average-pooled to
    the smaller, summed over positions / (H W), then scaled to unit Frobenius norm per image so
    layers and teachers of any activation scale weigh alike."""
    x, y = align(x, y)
    g = torch.einsum("bchw,bdhw->bcd", x, y) / (x.shape[-1] * x.shape[-2])
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]


@register_loss("crosslayer")
class CrossLayerGram(Loss):
    """Cross-layer KD (Chou, Chiu & Liao, "Cross-layer knowledge distillation with KL divergence
    and offline ensemble for compressing deep neural networks", APSIPA Trans. 2021; the Gram
    matrix between layers is FSP's, Yim et al. 2017). For every member and every pair of its
    stages (a, b), a < b (not only neighbours: that is the cross-layer part), the student
    reproduces the teacher's Gram matrix between a and b from its own stages at the same relative
    depths. Each student stage is mapped to the width of teacher stage a by its own 1x1-conv
    adapter, one set per member (members may differ in architecture), so one student stage
    learns from several teacher stages and several teachers. Loss: squared Frobenius distance of
    the normalised Gram matrices (in [0, 4]), mean over pairs, members weighted as the ensemble.
    Meant for stage one of two-stage training (`--two-stage`), followed by KL + CE."""

    features = "all"
    kind = "features"

    def __init__(self, student_channels: list[int], teacher_channels: list[list[int]], temperature: float):
        super().__init__(student_channels, teacher_channels, temperature)
        n = len(student_channels)
        self.pairs = [[(a, b) for a in range(len(st)) for b in range(a + 1, len(st))] or [(0, 0)]
                      for st in teacher_channels]
        self.student_stage = [[match_stage(a, len(st), n) for a in range(len(st))] for st in teacher_channels]
        self.adapters = nn.ModuleList(
            nn.ModuleList(adapter(student_channels[s], c) for s, c in zip(stages, st))
            for stages, st in zip(self.student_stage, teacher_channels))

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for m, member in enumerate(targets.features):
            adapted = {a: self.adapters[m][a](student.features[self.student_stage[m][a]])
                       for a in {x for pair in self.pairs[m] for x in pair}}
            per_pair = [(gram(adapted[a], adapted[b]) - gram(member[a], member[b])).pow(2).sum((1, 2)).mean()
                        for a, b in self.pairs[m]]
            losses.append(torch.stack(per_pair).mean())
        return weighted_mean(losses, feature_weights(targets))


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (B, C, H, W) map (Zagoruyko & Komodakis 2017): the channel mean of
    squared activations, flattened and L2-normalised per image -> (B, H W)."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def attention_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over positions of the squared difference of two maps' attention,
    the larger map pooled to the smaller's size: (B,)."""
    s, t = align(s, t)
    return (attention_map(s) - attention_map(t)).pow(2).mean(1)


AT_BETA = 1000.0  # the paper's beta for CIFAR: attention distances are ~1e-3 per position


@register_loss("at")
class AttentionTransfer(Loss):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017):
    each student stage's spatial attention map matches that of the teacher stage at the same
    relative depth, per member; no adapters, as attention maps do not depend on the channel count.
    beta = 1000 times the mean squared difference per position, mean over stages, members weighted."""

    features = "all"
    kind = "features"

    def __init__(self, student_channels: list[int], teacher_channels: list[list[int]], temperature: float):
        super().__init__(student_channels, teacher_channels, temperature)
        n = len(student_channels)
        self.teacher_stage = [[match_stage(i, n, len(st)) for i in range(n)] for st in teacher_channels]

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        losses = [torch.stack([attention_distance(f, member[j]).mean()
                               for f, j in zip(student.features, stages)]).mean()
                  for member, stages in zip(targets.features, self.teacher_stage)]
        return AT_BETA * weighted_mean(losses, feature_weights(targets))


@register_loss("rtk")
class RepresentativeTeacherKeys(Loss):
    """Representative Teacher Keys (Yang, Kao & Huang, "Representative Teacher Keys for Knowledge
    Distillation Model Compression Based on Attention Mechanism for Image Classification", 2022),
    on attention transfer. Every teacher stage of every member is a key, every student stage a
    query (both: the globally pooled features through a learned linear map to 64 dimensions). A
    student stage's attention over the keys, softmax(cos(q, k) / 0.1) per image, weighs how much
    it learns from each teacher stage's attention map: teacher information similar to the
    student's counts most. The representative keys are those at or above the uniform weight
    1/#keys; the others are filtered out (weight 0) and the rest renormalised, so the student is
    not pulled towards features it cannot use. Distances as in `at`, with the same beta."""

    features = "all"
    kind = "features"
    dim = 64
    tau = 0.1  # softmax temperature on cosine similarities in [-1, 1]

    def __init__(self, student_channels: list[int], teacher_channels: list[list[int]], temperature: float):
        super().__init__(student_channels, teacher_channels, temperature)
        self.queries = nn.ModuleList(nn.Linear(c, self.dim) for c in student_channels)
        self.keys = nn.ModuleList(nn.Linear(c, self.dim) for st in teacher_channels for c in st)

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        weights = feature_weights(targets)
        teacher = [(f, weights[m]) for m, member in enumerate(targets.features) for f in member]
        k = torch.stack([key(f.mean((2, 3))) for key, (f, _) in zip(self.keys, teacher)], 1)  # (B, N, d)
        q = torch.stack([query(f.mean((2, 3))) for query, f in zip(self.queries, student.features)], 1)  # (B, S, d)
        # members' weights enter as a prior over their keys: log w added before the softmax
        prior = torch.log(torch.stack([w for _, w in teacher]) * len(targets.features))  # (N,)
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2)  # (B, S, N)
        attn = torch.softmax(cosine / self.tau + prior, dim=-1)
        # the representative keys: at least uniform weight among the keys of weighted members
        # (always at least the most similar one)
        keep = (attn >= 1.0 / torch.isfinite(prior).sum()).detach()
        attn = attn * keep
        attn = attn / attn.sum(-1, keepdim=True)
        dist = torch.stack([torch.stack([attention_distance(s, t) for t, _ in teacher], 1)
                            for s in student.features], 1)  # (B, S, N)
        return AT_BETA * (attn * dist).sum(-1).mean()


class Criterion(nn.Module):
    """The weighted sum of the recipe's losses; losses of weight 0 are not built."""

    def __init__(self, weights: dict[str, float], student_channels: list[int], teacher_channels: list[list[int]],
                 temperature: float):
        super().__init__()
        if temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {temperature}")
        active = {name: w for name, w in weights.items() if w > 0}
        if not active:
            raise InputError(f"every loss of the recipe has weight 0: {weights}")
        self.weights = active
        self.losses = nn.ModuleDict({name: loss_class(name)(student_channels, teacher_channels, temperature)
                                     for name in active})

    @property
    def uses_teachers(self) -> bool:
        return any(loss.uses_teachers for loss in self.losses.values())

    @property
    def features(self) -> FeatureSet:
        return merge_feature_sets([loss.features for loss in self.losses.values()])

    def kinds(self) -> set[str]:
        return {loss.kind for loss in self.losses.values()}

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor,
                kind: str | None = None) -> torch.Tensor:
        """The weighted sum of every loss, or only of the losses of `kind` ("logits"/"features")."""
        return sum(w * self.losses[name](student, targets, labels) for name, w in self.weights.items()
                   if kind is None or self.losses[name].kind == kind)


def recipe_features(weights: dict[str, float]) -> FeatureSet:
    """The teacher feature maps a recipe needs, from the registry alone (no student needed)."""
    return merge_feature_sets([loss_class(n).features for n, w in weights.items() if w > 0])


def recipe_uses_teachers(weights: dict[str, float]) -> bool:
    return any(loss_class(n).uses_teachers for n, w in weights.items() if w > 0)


def logits_only(cfg: SearchConfig, ensemble: Ensemble) -> tuple[SearchConfig, str]:
    """`cfg` with a recipe the ensemble can serve, and a line when it differs: when no member exposes
    feature maps (every teacher is a file: logits only), the recipe's feature losses are left out
    (ce and kl when nothing else is left). Members without feature maps beside ones with them need
    nothing: the feature losses read the members that have them."""
    if ensemble.feature_members:
        return cfg, ""
    dropped = [n for n, w in cfg.distill.losses if w > 0 and loss_class(n).features]
    if not dropped:
        return cfg, ""
    kept = tuple((n, w) for n, w in cfg.distill.losses if n not in dropped and w > 0) or (("ce", 1.0), ("kl", 1.0))
    distill = dataclasses.replace(cfg.distill, losses=kept, two_stage=0.0)
    line = (f"no teacher exposes feature maps (teachers from files give logits only): the recipe's feature "
            f"loss{'es' if len(dropped) > 1 else ''} {', '.join(dropped)} left out; distilling with "
            f"{distill.describe()}")
    return dataclasses.replace(cfg, distill=distill), line
