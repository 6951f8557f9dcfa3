"""The fixed retrain every pick gets (`Retrains`), and the students and settings of the trial-score
benchmarks (`Bench`: trial_scores, pruners)."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.results import ResultsFile, machine, settings_id
from nas_kd.core.config import SearchConfig
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import Dataset
from nas_kd.device.export import student_metrics
from nas_kd.distill.losses import recipe_features
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nas.budget import Budget
from nas_kd.nas.objective import REPORT_IMAGES
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.nets.space import SearchSpace
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, ensemble_from_config


class Retrains:
    """Each pick's retrain with the search's final schedule and recipe (`base`, seed S: its
    --final-epochs on every training image, from the default teachers), tested once, in the results
    file's section "retrains" under `spec|seed|sid`: trained once, and kept when a run is killed.
    With `with_cost`, an entry also holds the spec's MACs and params."""

    def __init__(self, results: ResultsFile, base: SearchConfig, sid: str, with_cost: bool = False):
        self.results, self.base, self.sid, self.with_cost = results, base, sid, with_cost
        self.ensemble: Ensemble | None = None
        self.targets: CachedTargets | None = None

    def get(self, spec: Spec | str, seed: int) -> dict[str, Any] | None:
        return self.results.get("retrains", f"{spec}|{seed}|{self.sid}")

    def __call__(self, spec: Spec, seed: int, dataset: Dataset, label: str = "") -> dict[str, Any]:
        """The entry of `spec`'s retrain for `seed`, retrained here when missing (logged under
        `label` if one is given)."""
        if (entry := self.get(spec, seed)) is not None:
            return entry
        base = self.base
        if self.ensemble is None:  # the teachers' targets are computed once, for every retrain
            self.ensemble = ensemble_from_config(base, dataset, progress=False, log=lambda m: print("  " + m))
            batches = BatchIterator(dataset.train, dataset, base.train.batch_size, base.seed, views=1)
            self.targets = CachedTargets(self.ensemble, batches, recipe_features(base.distill.weights()), progress=False)
        cfg = dataclasses.replace(base, seed=seed)
        model, seconds = retrain(spec, dataset, self.ensemble, RetrainRecipe.of(cfg), progress=False, cached=self.targets)
        entry = {"spec": str(spec), "seed": seed, **student_metrics(model, dataset)}
        if self.with_cost:
            cost = count(build(spec, dataset.input_shape, dataset.num_classes), dataset.input_shape)
            entry |= {"macs": cost.macs, "params": cost.params}
        self.results.put("retrains", f"{spec}|{seed}|{self.sid}", {**entry, "seconds": round(seconds, 1),
                                                                   "machine": machine(dataset.train.x.device)})
        if label:
            print(f"  {label}: retrained {spec}, val {entry['val_acc']:.4f} ({seconds:.0f} s)", flush=True)
        return self.get(spec, seed)


@dataclasses.dataclass
class Bench:
    """What every phase of trial_scores shares: the search's defaults, data, teachers and results file."""

    cfg: SearchConfig
    dataset: Dataset
    space: SearchSpace
    budget: Budget
    ensemble: Ensemble
    results: ResultsFile

    def teacher_ids(self) -> list[str]:
        return [f"{t.name}:{t.digest}" for t in self.ensemble.members]


def reference_settings(bench: Bench, images: int) -> dict[str, Any]:
    """What a student's reference (its accuracy after the final retrain on `images`) depends on."""
    cfg = bench.cfg
    return {"what": "reference", "images": images, "epochs": cfg.final_epochs, "recipe": cfg.distill.describe(),
            "train": dataclasses.asdict(cfg.train), "seed": cfg.seed, "teachers": bench.teacher_ids(),
            "dataset": bench.dataset.fingerprint()}


def trial_settings(bench: Bench, what: str, **extra: Any) -> dict[str, Any]:
    """What a trial score `what` depends on."""
    cfg = bench.cfg
    return {"what": what, "recipe": cfg.distill.describe(), "train": dataclasses.asdict(cfg.train), "seed": cfg.seed,
            "teachers": bench.teacher_ids(), "dataset": bench.dataset.fingerprint(), **extra}


def distill_sid(bench: Bench, epochs: int, images: int) -> str:
    """The settings id of the distill scores of the schedule `epochs` x `images`."""
    cfg = bench.cfg
    return settings_id(trial_settings(bench, "distill", epochs=epochs, images=images,
                                      recalibration=cfg.bn_recalibration, reports=cfg.trial_reports,
                                      report_images=REPORT_IMAGES))
