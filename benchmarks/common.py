"""What the benchmarks share: their results files, the statistics of their tables, the picks (the
search's winner, the largest spec, the hand-made network), the retrain every pick gets, and the
students and settings of the trial-score benchmark (trial_scores, pruners).

Results files are small JSON files in benchmarks/results/ that the benchmarks fill one entry at a
time, so a killed run resumes where it stopped and a re-run with new scores costs no retraining.
Entries are keyed by what determines them (a spec and a digest of the settings); each write
replaces the file atomically. They are committed with the benchmarks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import scipy.stats
import torch

from nas_kd.core.config import SearchConfig
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import Dataset
from nas_kd.device.export import student_metrics
from nas_kd.distill.losses import recipe_features
from nas_kd.nas import start
from nas_kd.nas.budget import Budget
from nas_kd.nas.objective import REPORT_IMAGES
from nas_kd.nas.picks import pick_winner
from nas_kd.nas.records import SPEC_ATTR, was_trained
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SearchSpace
from nas_kd.pipeline.run import search
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, ensemble_from_config

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------- results files


def settings_id(settings: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the settings' sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def search_settings_id(base: SearchConfig, device: str) -> str:
    """The results' key of picks made and retrained with the search's defaults `base`: its fields
    but the seed, the cache folder and the time budget's; the device where it is not the CPU (the
    first CPU runs saw the default device, and keep their key)."""
    kept = {k: v for k, v in dataclasses.replace(base, device=SearchConfig.device).to_dict().items()
            if k not in ("seed", "cache_dir", "time_budget", "time_fixed", "final_augment", "search_share",
                         "int8_target", "budget_edge")}
    return settings_id({"config": json.dumps(kept, sort_keys=True), "v": 1, **({"device": device} if device != "cpu" else {})})


def machine(device: torch.device | None = None) -> str:
    """The processor, its cores and torch's threads, and the GPU where `device` is one."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}{gpu}")


class ResultsFile:
    """`{section: {key: entry}}` in one JSON file, which several processes may fill at once (say,
    the references and the scores of one benchmark): every write re-reads the file under a lock
    and adds its entry to what is there."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, section: str, key: str) -> Any:
        return self.data.get(section, {}).get(key)

    def refresh(self) -> None:
        """Read what other processes wrote since."""
        self.data = self._read()

    def put(self, section: str, key: str, entry: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()
            self.data.setdefault(section, {})[key] = entry
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)


# ---------------------------------------------------------------- statistics


def mean_sd(values: list[float]) -> str:
    """Accuracies (fractions) as "mean ± sd" in points; the sd of one value is nan."""
    sd = statistics.stdev(values) * 100 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values) * 100:.2f} ± {sd:.2f}"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho (ties share their mean rank); 0 when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(scipy.stats.spearmanr(x, y).statistic)


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b; 0 when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(scipy.stats.kendalltau(x, y).statistic)


def spearman_interval(x: list[float], y: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of Spearman's rho over `draws` resamples of the (x, y) pairs (a
    percentile bootstrap). The resamples are drawn with Python's `random.Random(seed)`, which drew
    the intervals in BENCHMARKS.md."""
    rng = random.Random(seed)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    values = sorted(spearman(x[i], y[i]) for i in (np.array([rng.randrange(n) for _ in range(n)]) for _ in range(draws)))
    return values[int(0.05 * draws)], values[int(0.95 * draws) - 1]


# ---------------------------------------------------------------- picks


def counter(input_shape: tuple[int, int, int], num_classes: int) -> Callable[[Spec], Cost]:
    """A spec's MACs and params at this input."""
    return lambda spec: count(build(spec, input_shape, num_classes, channels_last=False), input_shape)


def fitting_specs(space: SearchSpace, budget: Budget, n: int, seed: int, cost: Callable[[Spec], Cost],
                  max_draws: int = 200) -> list[tuple[Spec, Cost]]:
    """The first `n` distinct seeded random specs of the space whose cost fits the budget, in the
    order drawn (200 a draw), with their cost."""
    found: dict[str, tuple[Spec, Cost]] = {}
    draw = 0
    while len(found) < n:
        for spec in space.random_specs(200, seed * 1000 + draw):
            if str(spec) not in found and len(found) < n and budget.fits(c := cost(spec)):
                found[str(spec)] = (spec, c)
        draw += 1
        if draw > max_draws and len(found) < n:
            raise SystemExit(f"found only {len(found)} specs of {space.name} under {budget} in {draw * 200} draws")
    return list(found.values())


def largest(space: SearchSpace, budget: Budget, seed: int, cost: Callable[[Spec], Cost], n: int = 200,
            max_draws: int = 200) -> Spec:
    """Of the first `n` seeded random specs of the space that fit the budget, the one with the most
    MACs (ties: the greater string)."""
    found = fitting_specs(space, budget, n, seed, cost, max_draws)
    return max(found, key=lambda item: (item[1].macs, str(item[0])))[0]


def hand_made(budget: Budget, dataset: Dataset) -> Spec:
    """What a person would pick without a search (`nas_kd.nas.start.hand_made`): the deepest of
    ResNet-20, -14 and -8 that fits the budget at half its widths or more, scaled to fit."""
    found = start.hand_made(budget, dataset.input_shape, dataset.num_classes)
    if found is None:
        raise SystemExit(f"no width of ResNet-8 fits {budget}")
    return found[0]


def fresh_search(cfg: SearchConfig, work: Path, name: str) -> tuple[optuna.Study, float]:
    """`nas_kd.search` with `cfg` and --final-epochs 0 as study `name` in `work`, and its wall
    seconds. An unfinished study of that name there starts again; no other study is touched (a
    glob on the name's prefix once took seed 1's for seed 10's)."""
    run = dataclasses.replace(cfg, final_epochs=0, out_dir=str(work), study_name=name)
    for stale in [work / name, *work.glob(f"{name}.*")]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    started = time.perf_counter()
    study = search(run, progress=False)
    return study, time.perf_counter() - started


def search_pick(method: str, cfg: SearchConfig, work: Path) -> tuple[Spec, dict[str, Any]]:
    """The winner of `nas_kd.search` with `cfg` and --final-epochs 0, and what its study holds; the
    method "random" searches with --sampler random, "params" with --trial-score params. The study
    goes in `work`; an unfinished one there starts again."""
    run = dataclasses.replace(cfg, sampler="random" if method == "random" else cfg.sampler,
                              trial_score="params" if method == "params" else cfg.trial_score)
    study, _ = fresh_search(run, work, f"{method}-seed{cfg.seed}")
    winner = pick_winner(study)
    return Spec.parse(winner.user_attrs[SPEC_ATTR]), {
        "trial": winner.number, "trial_score": winner.value, "trials_in_study": len(study.trials),
        "trained": sum(was_trained(t) for t in study.trials)}


# ---------------------------------------------------------------- the retrain of a pick


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
        model, seconds = retrain(spec, dataset, self.ensemble, cfg, cfg.final_epochs, False, self.targets)
        entry = {"spec": str(spec), "seed": seed, **student_metrics(model, dataset)}
        if self.with_cost:
            cost = count(build(spec, dataset.input_shape, dataset.num_classes), dataset.input_shape)
            entry |= {"macs": cost.macs, "params": cost.params}
        self.results.put("retrains", f"{spec}|{seed}|{self.sid}", {**entry, "seconds": round(seconds, 1),
                                                                   "machine": machine(dataset.train.x.device)})
        if label:
            print(f"  {label}: retrained {spec}, val {entry['val_acc']:.4f} ({seconds:.0f} s)", flush=True)
        return self.get(spec, seed)


# ---------------------------------------------------------------- the trial-score students


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


def draw_specs(space: SearchSpace, budget: Budget, n: int, seed: int, input_shape: tuple[int, int, int],
               num_classes: int) -> list[tuple[Spec, Cost]]:
    """The trial-score students: `n` distinct seeded random specs that fit `budget`, in the order drawn."""
    return fitting_specs(space, budget, n, seed, counter(input_shape, num_classes))


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
