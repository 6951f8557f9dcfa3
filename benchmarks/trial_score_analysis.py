"""The trial-score benchmark's further analyses, from the stored references and scores alone: the
size line, design choices at equal cost, the floor, the half-cost schedule's time and the ceiling
of a search of N trials."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

import numpy as np

from benchmarks.retrains import Bench, distill_sid
from benchmarks.trial_score_runs import HALF_COST, SCHEDULES, default_row, recalibrated_row, slope
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost

CHOICES: dict[str, Callable[[Spec], float]] = {
    "squeeze-excite stages": lambda spec: sum(s.se for s in spec.stages),
    "kernel-5 stages": lambda spec: sum(s.kernel == 5 for s in spec.stages),
    "bottleneck stages": lambda spec: sum(s.block == "bottleneck" for s in spec.stages),
    "blocks": lambda spec: sum(s.depth for s in spec.stages),
    "stem channels / 8": lambda spec: spec.stem / 8,
}


def size_line(bench: Bench, rows: dict[str, tuple[list[float], list[float]]], reference: list[float]) -> str:
    """How much the default score and the reference rise per doubling of the parameter count: a
    brief trial biased against big students would rise less than the reference does."""
    default = default_row(bench)
    doublings = [math.log2(p) for p in rows["params"][0]]
    if default not in rows or len(set(doublings)) < 2:
        return "per doubling of the parameter count: needs the default score of 2 or more sizes of student"
    return (f"per doubling of the parameter count: {default} {100 * slope(doublings, rows[default][0]):+.2f} points, "
            f"the reference {100 * slope(doublings, reference):+.2f} points")


def choice_lines(specs: list[tuple[Spec, Cost]], reference: list[float], draws: int = 2000) -> list[str]:
    """What each design choice is worth at equal cost, the question of design-space refinement
    (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020): the reference regressed
    (least squares) on log2 MACs, log2 params and the count of one choice in the spec, one choice
    at a time; the choice's coefficient in points, with the 5th-95th percentile of `draws`
    bootstrap resamples of the students."""
    y = 100 * np.array(reference)
    cost = np.array([[1.0, math.log2(c.macs), math.log2(c.params)] for _, c in specs])
    out = [f"\n| choice, at equal MACs and params ({len(specs)} students) | points per unit [90% bootstrap] | "
           "students with it |", "|---|---|---|"]
    rng = np.random.default_rng(0)
    for name, feature in CHOICES.items():
        x = np.array([feature(s) for s, _ in specs], dtype=float)
        if x.std() == 0:
            continue
        design = np.c_[cost, x]
        coef = np.linalg.lstsq(design, y, rcond=None)[0][-1]
        boot = []
        for _ in range(draws):
            i = rng.integers(0, len(y), len(y))
            if np.linalg.matrix_rank(design[i]) == design.shape[1]:
                boot.append(np.linalg.lstsq(design[i], y[i], rcond=None)[0][-1])
        low, high = np.percentile(boot, [5, 95])
        out.append(f"| {name} | {coef:+.2f} [{low:+.2f}, {high:+.2f}] | {int((x > 0).sum())} |")
    return out


def floor_lines(bench: Bench, specs: list[tuple[Spec, Cost]], rows: dict[str, tuple[list[float], list[float]]],
                reference: list[float], floor: float, trials: int = 10, draws: int = 2000) -> list[str]:
    """What the search's budget floor `floor` (--budget-floor) does on these students: the mean reference below and
    above it, and the mean reference of the pick of a search of `trials` trials drawn at random
    from them (`draws` seeded draws), by the default score and by params, without and with the
    floor: a search that never trains the small students spends its trials on the others."""
    use = [bench.budget.use(c) for _, c in specs]
    above = [u >= floor for u in use]
    if not floor or all(above) or not any(above):
        return [f"budget floor {floor:.0%}: {sum(above)} of {len(specs)} students meet it; nothing to compare"]
    mean = statistics.mean
    out = [f"budget floor {floor:.0%}: {above.count(False)} students below it, mean reference "
           f"{100 * mean(r for r, a in zip(reference, above) if not a):.2f}%; {sum(above)} above, "
           f"{100 * mean(r for r, a in zip(reference, above) if a):.2f}%"]
    rng = random.Random(0)
    pools = {"no floor": list(range(len(specs))), "floor": [i for i, a in enumerate(above) if a]}
    for name in (default_row(bench), "params"):
        if name not in rows:
            continue
        values = rows[name][0]
        picks = {k: [] for k in pools}
        for _ in range(draws):
            for k, pool in pools.items():
                drawn = rng.sample(pool, min(trials, len(pool)))
                picks[k].append(reference[max(drawn, key=lambda i: values[i])])
        out.append(f"a {trials}-trial search drawn from them, picking by {name}: mean reference "
                   + ", ".join(f"{k} {100 * mean(v):.2f}%" for k, v in picks.items()))
    return out


def half_cost_time(bench: Bench, specs: list[tuple[Spec, Cost]]) -> float | None:
    """A HALF_COST trial's wall time as a share of a default one: its training is half, its
    validation passes (recalibration included) the same. The default trials' validation share is
    the median over `specs` of their cached seconds; measured within each trial, it does not
    depend on how busy the machine was. None without the default trials' seconds."""
    sid = distill_sid(bench, *SCHEDULES[0])
    entries = [bench.results.get("scores", f"{s}|{sid}") for s, _ in specs]
    if not entries or any(e is None for e in entries):
        return None
    validation = statistics.median(1 - e["train_seconds"] / e["seconds"] for e in entries)
    return validation + (1 - validation) / 2


def ceiling_lines(bench: Bench, rows: dict[str, tuple[list[float], list[float]]], reference: list[float],
                  baselines: dict[str, float], trials: tuple[int, ...], half_time: float | None = None,
                  draws: int = 2000) -> list[str]:
    """How good a search of n trials drawn at random from these students can be, for each n of
    `trials`: the mean reference of its pick and how often the pick is above each baseline's
    reference (`draws` seeded draws), picking by the default score, by params, by macs and by the
    reference itself (an oracle: a perfect score). A random sampler stands in for TPE, whose first
    trials are random. The n students are drawn with replacement, as from a space far larger than
    these students (without, 30 draws of 30 students would be all of them). When even the oracle's
    pick seldom beats a baseline, no score can make a search of n trials beat it: the space and the
    number of trials bound the search. The half-cost score is drawn at twice the trials (the same
    training) and, given `half_time` (`half_cost_time`), at n / half_time (the same wall time)."""
    mean = statistics.mean
    rows = {**rows, "oracle (the reference itself)": (reference, [0.0] * len(reference))}
    out = []
    for n in trials:
        half = [(recalibrated_row(bench, HALF_COST), 2 * n, " (the same training)")]
        if half_time:
            half.append((recalibrated_row(bench, HALF_COST), round(n / half_time), " (the same wall time)"))
        for name, k, same in ((default_row(bench), n, ""), *half, ("params", n, ""), ("macs", n, ""),
                              ("oracle (the reference itself)", n, "")):
            if name not in rows:
                continue
            rng = random.Random(k)
            draw = [rng.choices(range(len(reference)), k=k) for _ in range(draws)]
            values = rows[name][0]
            picks = [reference[max(d, key=lambda i: values[i])] for d in draw]
            above = "".join(f"; above {b} ({100 * ref:.2f}%) in {sum(p > ref for p in picks) / draws:.0%}"
                            for b, ref in baselines.items())
            out.append(f"{k} trials{same} drawn at random, picking by {name}: mean reference "
                       f"{100 * mean(picks):.2f}%{above}")
    return out
