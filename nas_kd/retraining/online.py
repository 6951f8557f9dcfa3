"""Online ensemble of students: retrain the top-k students of a finished study together, each
learning from the ensemble of all of them (Walawalkar, Shen & Savvides, "Online Ensemble Model
Compression using Knowledge Distillation", ECCV 2020), optionally from the offline teachers too.

    python -m nas_kd.retrain --study-name NAME --online-ensemble K [--with-teachers] [--final-epochs E]

One training run yields K compressed students of different costs: the k most accurate feasible
trials of the study's Pareto front (validation accuracy vs MACs). Each is tested once and exported
like the winner, into OUT_DIR/<study>/online/student<k>-trial<N>/.

Two departures from the paper, both to fit nas_kd: the online ensemble is the mean of the
students' logits (the paper fuses their features through its own classifier), and there are no
intermediate feature losses between the students; the offline teachers' feature losses come in
with `with_teachers`, through the study's own recipe. The training is one stage whatever the
recipe's `two_stage`: the online terms are logit losses and need the heads trained throughout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import torch
import torch.nn as nn
import torch.nn.functional as F
from optuna.trial import FrozenTrial

from nas_kd.core.config import DistillConfig, SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import Batch
from nas_kd.data.datasets import Dataset
from nas_kd.device.export import ExportSettings, export, student_metrics, teachers_test_metrics
from nas_kd.distill.losses import LOSSES, Criterion, StudentOutput, loss_class
from nas_kd.distill.student import RetrainRecipe, retrain_targets, seeded_student
from nas_kd.nas.picks import completed
from nas_kd.nas.records import SPEC_ATTR, cost_facts, is_feasible, pareto_front
from nas_kd.nas.study import ONLINE_ATTR
from nas_kd.nets.arch import Network, Spec, build
from nas_kd.nets.cost import count
from nas_kd.teaching.ensemble import Ensemble, Targets
from nas_kd.training.train import accuracy, fit, predict

# ---------------------------------------------------------------- which students


def top_students(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k most accurate feasible trained trials of the Pareto front (validation accuracy vs
    MACs), most accurate first; when the front holds fewer than k, the next most accurate feasible
    trials off the front fill the rest. Ties: fewer MACs, then the earlier trial."""
    if k < 2:
        raise InputError(f"--online-ensemble needs at least 2 students, got {k}")
    feasible = [t for t in completed(study) if is_feasible(t)]
    if len(feasible) < k:
        raise InputError(f"--online-ensemble {k}: study {study.study_name!r} has only {len(feasible)} feasible "
                         f"trained trial{'s' if len(feasible) != 1 else ''}; run more trials (--trials) or ask for fewer")
    on_front = set(pareto_front([float(t.user_attrs["macs"]) for t in feasible], [t.values[0] for t in feasible]))

    def rank(i: int) -> tuple[float, float, int]:
        return -feasible[i].values[0], feasible[i].user_attrs["macs"], feasible[i].number

    front = sorted(on_front, key=rank)
    rest = sorted(set(range(len(feasible))) - on_front, key=rank)
    return [feasible[i] for i in (front + rest)[:k]]


# ---------------------------------------------------------------- the loss


class OnlineTerms(NamedTuple):
    """The parts of the online-ensemble loss of one batch (K students, B images, C classes)."""

    ensemble: torch.Tensor  # (B, C) the online ensemble's logits: the students' mean
    ce: torch.Tensor  # (K,) each student's cross-entropy with the labels
    kl: torch.Tensor  # (K,) each student's T^2-scaled KL from the (detached) ensemble
    ensemble_ce: torch.Tensor  # () the ensemble's cross-entropy with the labels
    teachers: torch.Tensor | None  # (K,) each student's offline-teacher losses; None without teachers

    def total(self) -> torch.Tensor:
        """Summed over the students, so each student's gradient has the size of training it alone."""
        out = self.ce.sum() + self.kl.sum() + self.ensemble_ce
        return out if self.teachers is None else out + self.teachers.sum()


class OnlineEnsembleLoss(nn.Module):
    """Online ensemble distillation (Walawalkar, Shen & Savvides, ECCV 2020) of K students.

    With s_k the (B, C) logits of student k, y the (B,) labels and T the temperature:

        e      = (1/K) sum_k s_k                                          (B, C)
        loss   = sum_k [ CE(s_k, y) + T^2 KL(softmax(e/T).detach() || softmax(s_k/T))
                         + teachers_k(s_k, targets, y) ]
                 + CE(e, y)

    The KL teaches each student the ensemble's soft labels; the target is detached so a student
    is not pulled back towards the others through the ensemble's side of the KL. The ensemble's
    own CE trains the students to make a good ensemble together (its gradient reaches student k
    scaled by 1/K). `teachers_k` is student k's own `Criterion` for the offline teachers' losses
    (its adapters sized to that student), present only with `teacher_criteria`.
    """

    def __init__(self, n_students: int, temperature: float, teacher_criteria: list[Criterion] | None = None):
        super().__init__()
        if n_students < 2:
            raise InputError(f"an online ensemble needs at least 2 students, got {n_students}")
        if temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {temperature}")
        if teacher_criteria is not None and len(teacher_criteria) != n_students:
            raise ValueError(f"{len(teacher_criteria)} teacher criteria for {n_students} students")
        self.n_students = n_students
        self.temperature = temperature
        self.teacher_criteria = nn.ModuleList(teacher_criteria) if teacher_criteria else None

    def terms(self, students: list[StudentOutput], targets: Targets | None, labels: torch.Tensor) -> OnlineTerms:
        if len(students) != self.n_students:
            raise ValueError(f"{len(students)} student outputs for a loss of {self.n_students}")
        t = self.temperature
        logits = torch.stack([s.logits.float() for s in students])  # (K, B, C)
        ensemble = logits.mean(0)  # (B, C)
        log_target = F.log_softmax(ensemble.detach() / t, dim=-1)  # (B, C)
        log_p = F.log_softmax(logits / t, dim=-1)  # (K, B, C)
        # KL per student, summed over classes, mean over the batch (kl_div's "batchmean")
        kl = (log_target.exp() * (log_target - log_p)).sum(-1).mean(-1) * t * t  # (K,)
        ce = torch.stack([F.cross_entropy(s, labels) for s in logits])  # (K,)
        teachers = None
        if self.teacher_criteria is not None:
            teachers = torch.stack([c(s, targets, labels) for c, s in zip(self.teacher_criteria, students)])
        return OnlineTerms(ensemble, ce, kl, F.cross_entropy(ensemble, labels), teachers)

    def forward(self, students: list[StudentOutput], targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(students, targets, labels).total()


def teacher_recipe(recipe: DistillConfig) -> DistillConfig:
    """The recipe's losses that read the teachers (its label CE is already in the online loss)."""
    losses = tuple((name, w) for name, w in recipe.losses if w > 0 and loss_class(name).uses_teachers)
    if not losses:
        known = ", ".join(name for name, cls in LOSSES.items() if cls.uses_teachers)
        raise InputError(f"--with-teachers: the study's recipe {recipe} has no loss that uses the teachers "
                         f"(those are: {known})")
    return dataclasses.replace(recipe, losses=losses)


# ---------------------------------------------------------------- training


def train_online(specs: list[Spec], dataset: Dataset, ensemble: Ensemble, recipe: RetrainRecipe,
                 epochs: int | None = None, with_teachers: bool = False,
                 progress: bool = True) -> tuple[list[Network], float]:
    """Train fresh networks of `specs` together (student k seeded with recipe.seed + k) on the whole
    training split for `epochs` (default: the recipe's), one optimiser and schedule over all of them
    and their adapters; with the teachers, through `teacher_recipe(recipe.distill)`. Returns the
    students in eval mode and the training seconds."""
    device = dataset.train.x.device
    epochs = recipe.epochs if epochs is None else epochs
    taught = teacher_recipe(recipe.distill) if with_teachers else None
    students: list[Network] = []
    criteria: list[Criterion] = []
    for k, spec in enumerate(specs):
        make = lambda spec=spec: build(spec, dataset.input_shape, dataset.num_classes).to(device)  # noqa: E731
        student, criterion = seeded_student(make, recipe.seed + k, taught, ensemble.feature_channels)
        students.append(student)
        if criterion is not None:
            criteria.append(criterion)
    loss = OnlineEnsembleLoss(len(specs), recipe.distill.temperature, criteria or None)
    # every criterion reads the same teacher outputs: the first one decides the source (labels
    # only, without teachers: a fresh augmented view every epoch)
    batches, targets = retrain_targets(ensemble, dataset, recipe, criteria[0] if criteria else None, progress=progress,
                                       epochs=epochs)

    def step(batch: Batch) -> torch.Tensor:
        outputs = []
        for student in students:
            features = student.forward_features(batch.x)
            outputs.append(StudentOutput(student.forward_head(features[-1]), features))
        return loss(outputs, targets(batch) if targets is not None else None, batch.y)

    modules = nn.ModuleDict({"students": nn.ModuleList(students), "loss": loss})
    seconds = fit(modules, batches, step, recipe.train, epochs, desc=f"online x{len(specs)}", progress=progress)
    return [s.eval() for s in students], seconds


def ensemble_accuracy(students: list[Network], dataset: Dataset) -> dict[str, float]:
    """Test and validation accuracy of the students' mean logits, as trained."""
    out = {}
    for name, split in (("test", dataset.test), ("val", dataset.val)):
        logits = torch.stack([predict(s, split, dataset) for s in students]).mean(0)  # (N, C)
        out[name] = accuracy(logits, split.y)
    return out


def retrain_online(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig, k: int,
                   with_teachers: bool, out_dir: Path, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pick the top-k students, train them together for cfg.final_epochs, test and export each into
    out_dir/student<k>-trial<N>/, write out_dir/online.json and store it as the study's
    `online_ensemble` attribute; returns that summary."""
    trials = top_students(study, k)
    specs = [Spec.parse(t.user_attrs[SPEC_ATTR]) for t in trials]
    recipe = f"online ensemble of {k} (T={cfg.distill.temperature:g})"
    if with_teachers:
        recipe += f" + offline teachers {teacher_recipe(cfg.distill).describe()}"
    log(f"training trials {', '.join(str(t.number) for t in trials)} together for {cfg.final_epochs} epochs: {recipe}")
    start = time.perf_counter()
    students, seconds = train_online(specs, dataset, ensemble, RetrainRecipe.of(cfg), with_teachers=with_teachers,
                                     progress=progress)
    compression_teacher = ensemble.compression_reference()
    teachers = teachers_test_metrics(dataset, ensemble)  # once, not per student
    exported = []
    for i, (trial, model) in enumerate(zip(trials, students)):
        metrics = {"trial": trial.number, "spec": str(model.spec),
                   **cost_facts(count(model, dataset.input_shape), compression_teacher),
                   "search_val_acc": trial.values[0], "final_epochs": cfg.final_epochs,
                   **student_metrics(model, dataset), **teachers, "train_seconds": round(seconds, 2),
                   "recipe": recipe, "with_teachers": with_teachers, "temperature": cfg.distill.temperature}
        weights, metrics_path = export(model, dataset, ExportSettings.of(cfg), metrics, out_dir / f"student{i}-trial{trial.number}")
        metrics["weights"], metrics["metrics_file"] = str(weights), str(metrics_path)
        log(f"student {i}: trial {trial.number} test acc {metrics['test_acc']:.4f}")
        exported.append(metrics)
    together = ensemble_accuracy(students, dataset)
    summary = {"k": k, "trials": [t.number for t in trials], "recipe": recipe, "with_teachers": with_teachers,
               "final_epochs": cfg.final_epochs, "students": exported,
               "online_ensemble_test_acc": together["test"], "online_ensemble_val_acc": together["val"],
               "teachers_ensemble_test_acc": exported[0]["ensemble_test_acc"], "train_seconds": round(seconds, 2),
               "retrain_seconds": round(time.perf_counter() - start, 2)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "online.json").write_text(json.dumps(summary, indent=2) + "\n")
    study.set_user_attr(ONLINE_ATTR, summary)
    log(f"online ensemble of {k}: test acc {together['test']:.4f} "
        f"(teachers {summary['teachers_ensemble_test_acc']:.4f}); {out_dir / 'online.json'}")
    return summary
