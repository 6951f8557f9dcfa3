"""The picks a search is measured against, and the search's own: students drawn within a budget, the
largest spec that fits, the hand-made network scaled to the budget, and a fresh search's winner."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from nas_kd.core.config import SearchConfig
from nas_kd.data.datasets import Dataset
from nas_kd.nas import edge, start
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import pick_winner
from nas_kd.nas.records import SPEC_ATTR, was_trained
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SearchSpace
from nas_kd.pipeline.run import search


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
    ResNet-20, -14 and -8 that fits the budget at 0.45 of its widths or more, scaled to fit."""
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


def draw_specs(space: SearchSpace, budget: Budget, n: int, seed: int, input_shape: tuple[int, int, int],
               num_classes: int, at_edge: bool = False, cap: int = 0) -> list[tuple[Spec, Cost]]:
    """The trial-score students: `n` distinct seeded random specs that fit `budget`, in the order
    drawn; `at_edge`: random shapes repaired to the budget's edge as the search's trials are, their
    depths capped at `cap` blocks a stage as `--edge-depth family` does (0: drawn free)."""
    if at_edge:
        return edge_specs(space, budget, n, seed, counter(input_shape, num_classes), cap=cap)
    return fitting_specs(space, budget, n, seed, counter(input_shape, num_classes))


def edge_specs(space: SearchSpace, budget: Budget, n: int, seed: int, cost: Callable[[Spec], Cost],
               max_draws: int = 2000, cap: int = 0) -> list[tuple[Spec, Cost]]:
    """The first `n` distinct students that seeded random shapes (`SearchSpace.sample(shape=True)`,
    Optuna's random sampler) become when repaired to the budget's edge (`nas_kd.nas.edge.repair`,
    the search's defaults; depths mapped under `cap` by `nas_kd.nas.edge.capped` first, 0: drawn
    free), in the order drawn, with their cost; a shape that does not fit even at the least widths
    is skipped."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: dict[str, tuple[Spec, Cost]] = {}
    for _ in range(max_draws):
        if len(found) == n:
            return list(found.values())
        trial = study.ask()
        shape = space.sample(trial, shape=True)
        fixed = edge.repair(edge.capped(shape, space, cap) if cap else shape, space, budget, cost)
        study.tell(trial, 0.0)
        if budget.fits(fixed.cost) and str(fixed.spec) not in found:
            found[str(fixed.spec)] = (fixed.spec, fixed.cost)
    raise SystemExit(f"found only {len(found)} students of {space.name} at the edge of {budget} in {max_draws} shapes")
