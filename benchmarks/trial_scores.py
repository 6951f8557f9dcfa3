"""How well each trial score ranks students against what the search is trying to predict.

    python -m benchmarks.trial_scores --budget 50M --specs 30
    python -m benchmarks.trial_scores --budget 5M --specs 20

It draws `--specs` seeded random students of the default search space (or `--search-space`) under
`--budget` MACs and,
for each, its **reference**: validation accuracy after the search's final retrain (the default
`--final-epochs` and recipe, from the default teachers) on `--reference-images` training images
(the whole training split with 0). Then it computes every trial score of the search on the same
specs, each exactly as a trial would (`objective.TRIAL_SCORES`, the search's trial subset and
teachers), and prints one table: per score, Spearman's rho with a bootstrap 90% interval,
Kendall's tau, precision of its top 3 (how many of the reference's best 3 it ranks in its own
top 3), regret of its pick in points of reference accuracy, and seconds per spec.

Two more rows come from the default score's trainings, with nothing more trained: its curve of
validation accuracies extrapolated to the reference's steps, and (`--capacity-prior W ...`) the
score plus W x log2(params). `--baselines` also computes the reference of the hand-made network
and of the largest of 200 random specs (`benchmarks.search_vs_baselines`' untrained picks) and prints
how many of the random specs reach above them. `--half-cost` adds the distill score at 2 x 2000
images, half the default's training. With `--table-only`, `--ceiling N ...` simulates searches of
N trials drawn from the students, picking by the default score, by the half-cost score (2N
trials: the same training; and as many as take the same wall time), by params, by macs and by
the reference itself (a perfect score), against the baselines' references: what bounds a search
of N trials. `--choices` (with `--table-only`) regresses the reference on the students' cost and
each design choice in turn: what squeeze-excite, kernel 5, bottleneck blocks, depth and the stem
are worth at equal MACs and params (design-space refinement, Radosavovic et al. 2020).

References and scores are kept in `benchmarks/results/trial_scores.json`, keyed by spec and a
digest of the settings that determine them, so a killed run goes on where it stopped and a
re-run with a new score retrains nothing. The test split is never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from benchmarks.common import (
    RESULTS,
    Bench,
    ResultsFile,
    counter,
    distill_sid,
    draw_specs,
    hand_made,
    kendall,
    largest,
    machine,
    reference_settings,
    settings_id,
    spearman,
    spearman_interval,
    trial_settings,
)
from nas_kd.core.config import SearchConfig, steps_per_epoch
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count, parse_count
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Split, load_dataset
from nas_kd.distill.blockwise import BlockwiseScorer, most_accurate
from nas_kd.distill.losses import recipe_features
from nas_kd.nas.budget import Budget
from nas_kd.nas.objective import PROXY_BATCH, TRIAL_SCORES, TrialContext, proxy_scores, trial_context
from nas_kd.nas.records import CURVE_ATTR
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import load_space
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets, ensemble_from_config
from nas_kd.training.train import evaluate


def top_k_precision(score: list[float], reference: list[float], k: int = 3) -> float:
    """Share of the reference's best k that are also among the score's best k."""
    best = set(sorted(range(len(reference)), key=reference.__getitem__)[-k:])
    picked = set(sorted(range(len(score)), key=score.__getitem__)[-k:])
    return len(best & picked) / k


def regret(score: list[float], reference: list[float]) -> float:
    """Points of reference accuracy lost by taking the score's best spec (ties: the mean)."""
    top = max(score)
    picked = [reference[i] for i, s in enumerate(score) if s == top]
    return (max(reference) - statistics.mean(picked)) * 100


def references(bench: Bench, specs: list[tuple[Spec, Cost]], images: int, log: Callable[[str], None],
               reverse: bool = False) -> list[float]:
    """Each spec's val accuracy after the final retrain on `images` training images (0: all).
    Specs another process has finished meanwhile are skipped (run a second process with
    `reverse` to share the work)."""
    cfg, dataset = bench.cfg, bench.dataset
    sid = settings_id(reference_settings(bench, images))
    missing = [(s, c) for s, c in specs if bench.results.get("references", f"{s}|{sid}") is None]
    if reverse:
        missing.reverse()
    if missing:
        data = dataset
        if images:
            keep = seeded_subset(len(dataset.train), images, cfg.seed)
            data = dataclasses.replace(dataset, train=Split(dataset.train.x[keep], dataset.train.y[keep]))
        batches = BatchIterator(data.train, data, cfg.train.batch_size, cfg.seed, views=1, augment=cfg.train.augment)
        targets = CachedTargets(bench.ensemble, batches, recipe_features(cfg.distill.weights()), progress=False)
        for n, (spec, cost) in enumerate(missing):
            bench.results.refresh()
            if bench.results.get("references", f"{spec}|{sid}") is not None:
                continue
            model, seconds = retrain(spec, data, bench.ensemble, cfg, cfg.final_epochs, False, targets)
            acc = evaluate(model, dataset.val, dataset)
            bench.results.put("references", f"{spec}|{sid}", {
                "spec": str(spec), "macs": cost.macs, "params": cost.params, "val_acc": round(acc, 6),
                "seconds": round(seconds, 1), "machine": machine(), "settings": reference_settings(bench, images)})
            log(f"  reference {n + 1}/{len(missing)}: {format_count(cost.macs):>7s} MACs  val {acc:.4f}  "
                f"({seconds:.0f} s)  {spec}")
    return [bench.results.get("references", f"{s}|{sid}")["val_acc"] for s, _ in specs]


SCHEDULES = ((2, 4000), (1, 8000), (4, 2000))  # (epochs, images) of about equal cost; the first is the old default
# the default's epochs on half its images (--half-cost): twice the trials for the same training. Trained as given
# here; a search with --subset 2000 raises it to 4 epochs (a trial makes --min-steps / 20 steps, 60 by default;
# 2 x 2000 is 30) unless run with --min-steps 600 or less
HALF_COST = (2, 2000)


def trial_scores(bench: Bench, specs: list[tuple[Spec, Cost]], log: Callable[[str], None],
                 blockwise: bool = True, half_cost: bool = False) -> None:
    """Every trial score of every spec, each computed as a trial of the search computes it, into
    the results file (section "scores"): proxies; distill at each of SCHEDULES, with the raw and
    the recalibrated final accuracy and the curve of the pruner's reports; blockwise without and
    with recalibration (one training: R^2 before and after); with `half_cost`, distill at HALF_COST
    too, last."""
    cfg, dataset = bench.cfg, bench.dataset
    most_images = max(images for _, images in SCHEDULES)
    cover = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=1, augment=cfg.train.augment,
                          indices=seeded_subset(len(dataset.train), most_images, cfg.seed))
    features = recipe_features(cfg.distill.weights())
    targets = None

    def context(epochs: int, images: int, scorer: BlockwiseScorer | None = None) -> TrialContext:
        sub = dataclasses.replace(cfg, subset=images, trial_epochs=epochs)
        batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=1,
                                augment=cfg.train.augment, indices=seeded_subset(len(dataset.train), images, cfg.seed))
        return trial_context(bench.space, dataset, bench.ensemble, bench.budget, batches, targets, sub, False, scorer)

    def fresh_trial() -> tuple[optuna.Study, optuna.Trial]:
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
        return study, study.ask()

    scorer: BlockwiseScorer | None = None
    proxy_sid = settings_id(trial_settings(bench, "proxies", batch=PROXY_BATCH))

    def score_spec(n: int, spec: Spec, cost: Cost, schedules: tuple[tuple[int, int], ...], with_blockwise: bool) -> None:
        nonlocal targets, scorer
        done = []
        key = f"{spec}|{proxy_sid}"
        if bench.results.get("scores", key) is None:
            ctx = context(*SCHEDULES[0])
            start = time.perf_counter()
            values = proxy_scores(ctx, spec, cost)
            bench.results.put("scores", key, {"spec": str(spec), "proxies": values,
                                              "seconds": round(time.perf_counter() - start, 3)})
            done.append("proxies")
        for epochs, images in schedules:
            sid = distill_sid(bench, epochs, images)
            if bench.results.get("scores", f"{spec}|{sid}") is not None:
                continue
            if targets is None:
                targets = CachedTargets(bench.ensemble, cover, features, progress=False)
            ctx = context(epochs, images)
            _, trial = fresh_trial()
            value = TRIAL_SCORES["distill"](ctx, trial, spec)
            a = trial.user_attrs
            bench.results.put("scores", f"{spec}|{sid}", {
                "spec": str(spec), "schedule": f"{epochs}x{images}", "recalibrated": value, "raw": a["val_acc_raw"],
                "curve": a[CURVE_ATTR], "seconds": round(a["train_seconds"] + a["eval_seconds"], 3),
                "train_seconds": a["train_seconds"], "machine": machine()})
            done.append(f"{epochs}x{images} {a['val_acc_raw']:.4f}/{value:.4f}")
        if with_blockwise:
            epochs, images = SCHEDULES[0]
            teacher = most_accurate(bench.ensemble.members)
            sid = settings_id(trial_settings(bench, "blockwise", epochs=epochs, images=images, teacher=teacher.digest,
                                             recalibration=cfg.bn_recalibration))
            if bench.results.get("scores", f"{spec}|{sid}") is None:
                if scorer is None:
                    scorer = BlockwiseScorer(teacher, dataset, context(epochs, images).batches, cfg.train, epochs,
                                             cfg.seed, recalibration=cfg.bn_recalibration)
                start = time.perf_counter()
                raw, recalibrated = [], []
                for i in range(len(spec.stages)):
                    net = scorer.stage_net(spec, i)
                    scorer.train_stage(net)
                    raw.append(scorer.r2(net))
                    scorer.recalibrate(net)
                    recalibrated.append(scorer.r2(net))
                bench.results.put("scores", f"{spec}|{sid}", {
                    "spec": str(spec), "raw": statistics.mean(raw), "recalibrated": statistics.mean(recalibrated),
                    "stages_raw": raw, "stages_recalibrated": recalibrated,
                    "seconds": round(time.perf_counter() - start, 3), "machine": machine()})
                done.append(f"blockwise {statistics.mean(raw):.3f}/{statistics.mean(recalibrated):.3f}")
        if done:
            log(f"  scores {n + 1}/{len(specs)}: {format_count(cost.macs):>7s} MACs  {'  '.join(done)}  {spec}")

    # in rounds, so that a run stopped early has every spec's cheap and default scores: the proxies
    # and the first schedule, then the other schedules, then the block-wise scores
    rounds = ((SCHEDULES[:1], False), (SCHEDULES[1:], False), ((), blockwise), ((HALF_COST,) if half_cost else (), False))
    for schedules, with_blockwise in rounds:
        for n, (spec, cost) in enumerate(specs):
            score_spec(n, spec, cost, schedules, with_blockwise)


def score_rows(bench: Bench, specs: list[tuple[Spec, Cost]], reference_images: int = 20000,
               capacity_priors: tuple[float, ...] = ()) -> dict[str, tuple[list[float], list[float]]]:
    """Per score row of the table, (its value for each spec, its seconds for each spec), from the
    results file; rows whose scores are missing for some spec are left out. Two rows are read
    from the default score's training, nothing more trained: its validation curve extrapolated to
    the reference's steps, and, per weight w of `capacity_priors`, the score plus w x log2 of the
    parameter count (a prior that bigger students gain more from the long retrain)."""
    cfg = bench.cfg
    rows: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, entries: list[dict[str, Any] | None], value: Callable[[dict[str, Any]], float],
            seconds: Callable[[dict[str, Any]], float]) -> None:
        if all(e is not None for e in entries):
            rows[name] = ([value(e) for e in entries], [seconds(e) for e in entries])

    recal = f"recalibrated ({cfg.bn_recalibration} batches)"
    for n, (epochs, images) in enumerate(SCHEDULES + (HALF_COST,)):
        entries = [bench.results.get("scores", f"{s}|{distill_sid(bench, epochs, images)}") for s, _ in specs]
        old = " (the old default)" if n == 0 else ""
        add(f"distill {epochs}x{images}{old}", entries, lambda e: e["raw"], lambda e: e["seconds"])
        add(recalibrated_row(bench, (epochs, images)), entries, lambda e: e["recalibrated"], lambda e: e["seconds"])
    epochs, images = SCHEDULES[0]
    teacher = most_accurate(bench.ensemble.members)
    sid = settings_id(trial_settings(bench, "blockwise", epochs=epochs, images=images, teacher=teacher.digest,
                                     recalibration=cfg.bn_recalibration))
    entries = [bench.results.get("scores", f"{s}|{sid}") for s, _ in specs]
    add(f"blockwise {epochs}x{images} vs {teacher.name}", entries, lambda e: e["raw"], lambda e: e["seconds"])
    add(f"blockwise {epochs}x{images} vs {teacher.name}, {recal}", entries, lambda e: e["recalibrated"],
        lambda e: e["seconds"])
    proxy_sid = settings_id(trial_settings(bench, "proxies", batch=PROXY_BATCH))
    entries = [bench.results.get("scores", f"{s}|{proxy_sid}") for s, _ in specs]
    for name in ("naswot", "synflow"):
        add(name, entries, lambda e, name=name: e["proxies"][name], lambda e: e["seconds"])
    rows["macs"] = ([float(c.macs) for _, c in specs], [0.0] * len(specs))
    rows["params"] = ([float(c.params) for _, c in specs], [0.0] * len(specs))
    default = default_row(bench)
    if default in rows:
        values, seconds = rows[default]
        first = distill_sid(bench, epochs, images)
        entries = [bench.results.get("scores", f"{s}|{first}") for s, _ in specs]
        steps = reference_steps(bench, reference_images) / (epochs * steps_per_epoch(images, cfg.train.batch_size))
        rows[f"{default}, curve extrapolated x{steps:.1f} steps"] = (
            [extrapolated(e["curve"], steps) for e in entries], seconds)
        for weight in capacity_priors:
            rows[f"{default} + {weight:g} x log2(params)"] = (
                [v + weight * math.log2(c.params) for v, (_, c) in zip(values, specs)], seconds)
    return rows


def reference_steps(bench: Bench, images: int) -> int:
    """Optimizer steps of a reference's retrain."""
    cfg = bench.cfg
    return cfg.final_epochs * steps_per_epoch(images or len(bench.dataset.train), cfg.train.batch_size)


def extrapolated(curve: list[list[float]], factor: float) -> float:
    """A trial's curve [[epochs, acc], ...] carried on to `factor` times its last point by a
    least-squares line through all its points in log(epochs) (Domhan et al. 2015 fit richer,
    saturating families to longer curves). A rank, not an accuracy: the line does not level off,
    and through the steep start of a one-cycle schedule it overshoots (0.93-1.45 at x7.5 on the
    benchmark's students)."""
    xs, ys = [math.log2(e) for e, _ in curve], [a for _, a in curve]
    if len(curve) < 2:
        return ys[-1]
    return ys[-1] + slope(xs, ys) * math.log2(factor)


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y on x."""
    return statistics.linear_regression(x, y).slope


def recalibrated_row(bench: Bench, schedule: tuple[int, int]) -> str:
    """The table's row name of the distill score at `schedule` (epochs, images), recalibrated."""
    epochs, images = schedule
    return f"distill {epochs}x{images} recalibrated ({bench.cfg.bn_recalibration} batches)"


def default_row(bench: Bench) -> str:
    """The table's row name of the default score: the first schedule, recalibrated."""
    return recalibrated_row(bench, SCHEDULES[0])


def size_line(bench: Bench, rows: dict[str, tuple[list[float], list[float]]], reference: list[float]) -> str:
    """How much the default score and the reference rise per doubling of the parameter count: a
    brief trial biased against big students would rise less than the reference does."""
    default = default_row(bench)
    doublings = [math.log2(p) for p in rows["params"][0]]
    if default not in rows or len(set(doublings)) < 2:
        return "per doubling of the parameter count: needs the default score of 2 or more sizes of student"
    return (f"per doubling of the parameter count: {default} {100 * slope(doublings, rows[default][0]):+.2f} points, "
            f"the reference {100 * slope(doublings, reference):+.2f} points")


CHOICES: dict[str, Callable[[Spec], float]] = {
    "squeeze-excite stages": lambda spec: sum(s.se for s in spec.stages),
    "kernel-5 stages": lambda spec: sum(s.kernel == 5 for s in spec.stages),
    "bottleneck stages": lambda spec: sum(s.block == "bottleneck" for s in spec.stages),
    "blocks": lambda spec: sum(s.depth for s in spec.stages),
    "stem channels / 8": lambda spec: spec.stem / 8,
}


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



def table(rows: dict[str, tuple[list[float], list[float]]], reference: list[float]) -> list[dict[str, Any]]:
    out = []
    for name, (values, seconds) in rows.items():
        lo, hi = spearman_interval(values, reference)
        out.append({"score": name, "spearman": spearman(values, reference), "interval": (lo, hi),
                    "kendall": kendall(values, reference), "top3": top_k_precision(values, reference),
                    "regret_pp": regret(values, reference), "seconds": statistics.mean(seconds)})
    return out


def baseline_references(bench: Bench, specs: list[tuple[Spec, Cost]], images: int, seed: int,
                        log: Callable[[str], None], compute: bool) -> dict[str, float]:
    """The reference of the two picks of benchmarks.search_vs_baselines that need no training
    (the hand-made network scaled to the budget, the largest of 200 random specs drawn with
    `seed`), beside the random specs': does the space hold a better student than they are?
    Computed if `compute`, else printed only when already in the results file. Returns the
    references known, by pick."""
    sid = settings_id(reference_settings(bench, images))
    known = [(s, bench.results.get("references", f"{s}|{sid}")) for s, _ in specs]
    known = [(s, e["val_acc"]) for s, e in known if e is not None]
    found: dict[str, float] = {}
    if not known:
        return found
    shape, classes = bench.dataset.input_shape, bench.dataset.num_classes
    best_spec, best = max(known, key=lambda item: item[1])
    log(f"the best of the {len(known)} random specs with a reference: val {best:.4f}  {best_spec}")
    cost_of = counter(shape, classes)
    picks = {"hand-made": hand_made(bench.budget, bench.dataset),
             "largest of 200": largest(bench.space, bench.budget, seed, cost_of)}
    costs = {name: cost_of(spec) for name, spec in picks.items()}
    if compute:  # one call: the teachers' targets are computed once for both
        references(bench, [(picks[name], costs[name]) for name in picks], images, log)
    for name, spec in picks.items():
        cost = costs[name]
        entry = bench.results.get("references", f"{spec}|{sid}")
        if entry is None:
            continue
        found[name] = entry["val_acc"]
        above = sum(acc > entry["val_acc"] for _, acc in known)
        try:
            bench.space.params_of(spec)
            where = "in the space"
        except InputError as e:
            where = f"outside the space ({e})"
        log(f"{name}: {format_count(cost.macs)} MACs, {format_count(cost.params)} params, val {entry['val_acc']:.4f}; "
            f"{above} of the {len(known)} random specs above it; {where}  {spec}")
    return found


def print_table(results: list[dict[str, Any]]) -> None:
    print("| score | Spearman ρ [90% bootstrap] | Kendall τ | top-3 precision | regret (pp) | s / spec |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["interval"]
        print(f"| {r['score']} | {r['spearman']:.2f} [{lo:.2f}, {hi:.2f}] | {r['kendall']:.2f} | {r['top3']:.2f} | "
              f"{r['regret_pp']:.2f} | {r['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=parse_count, default=50_000_000, help="MACs, e.g. 50M or 5M")
    parser.add_argument("--specs", type=int, default=30, help="random students that fit the budget")
    parser.add_argument("--seed", type=int, default=0, help="draws the specs")
    parser.add_argument("--reference-images", type=int, default=20000, help="0 = the whole training split")
    parser.add_argument("--references-only", action="store_true", help="compute the references and stop")
    parser.add_argument("--reverse", action="store_true", help="compute missing references last spec first (a "
                                                                "second process shares the work)")
    parser.add_argument("--scores-only", action="store_true", help="compute the scores (not the references) and stop")
    parser.add_argument("--no-blockwise", action="store_true", help="leave the block-wise scores out")
    parser.add_argument("--table-only", action="store_true", help="compute nothing: the table over the specs that "
                                                                  "have a reference so far")
    parser.add_argument("--baselines", action="store_true", help="also the references of the hand-made network "
                        "and the largest of 200 random specs (search_vs_baselines.py's untrained picks)")
    parser.add_argument("--capacity-prior", type=float, nargs="+", default=[], metavar="W",
                        help="rows of the default score + W x log2(params), one a weight")
    parser.add_argument("--half-cost", action="store_true",
                        help=f"also the distill score at {HALF_COST[0]}x{HALF_COST[1]}: half the default's training")
    parser.add_argument("--ceiling", type=int, nargs="+", default=[], metavar="N",
                        help="with --table-only: what searches of N trials drawn from these students pick, by "
                             "the scores and by the reference itself, against the baselines' references")
    parser.add_argument("--budget-floor", type=float, default=0.5,
                        help="the search's --budget-floor whose effect on these students is printed")
    parser.add_argument("--choices", action="store_true", help="with --table-only: what each design choice (squeeze-"
                        "excite, kernel 5, bottleneck blocks, depth, stem) is worth at equal MACs and params")
    parser.add_argument("--search-space", default=SearchConfig().search_space, metavar="NAME|YAML",
                        help="the space the students are drawn from (default: the search's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--results", type=Path, default=RESULTS / "trial_scores.json")
    args = parser.parse_args()
    if args.baselines and args.scores_only:
        parser.error("--baselines computes references, --scores-only none: pass one of them")
    if args.ceiling and not args.table_only:
        parser.error("--ceiling simulates searches from what the results file holds: add --table-only")
    if args.half_cost and args.table_only:
        parser.error("--half-cost computes the 2 x 2000 scores, --table-only nothing: drop one (the table shows "
                     "them whenever every student has one)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    cfg = SearchConfig(flops_budget=args.budget, cache_dir=args.cache_dir, search_space=args.search_space)
    dataset = load_dataset(cfg.dataset)
    space = load_space(cfg.search_space)
    budget = Budget.from_config(cfg)
    ensemble = ensemble_from_config(cfg, dataset, progress=False, log=lambda m: log("  " + m))
    bench = Bench(cfg, dataset, space, budget, ensemble, ResultsFile(args.results))
    specs = draw_specs(space, budget, args.specs, args.seed, dataset.input_shape, dataset.num_classes)
    log(f"{len(specs)} random specs of {space.name} under {budget} (seed {args.seed}); reference: "
        f"{cfg.final_epochs} epochs on {args.reference_images or len(dataset.train)} images, recipe "
        f"{cfg.distill.describe()}; {machine()}")
    priors = tuple(args.capacity_prior)
    if args.table_only:
        sid = settings_id(reference_settings(bench, args.reference_images))
        epochs, images = SCHEDULES[0]
        first = distill_sid(bench, epochs, images)
        have = [(s, c) for s, c in specs if bench.results.get("references", f"{s}|{sid}") is not None
                and bench.results.get("scores", f"{s}|{first}") is not None]
        rows = score_rows(bench, have, args.reference_images, priors)
        log(f"table only: {len(have)} of {len(specs)} specs have a reference and a {epochs}x{images} score; rows "
            f"missing a score of any of them are left out")
        reference = [bench.results.get("references", f"{s}|{sid}")["val_acc"] for s, _ in have]
        print_table(table(rows, reference))
        log(size_line(bench, rows, reference))
        for line in floor_lines(bench, have, rows, reference, args.budget_floor):
            log(line)
        if args.choices:
            for line in choice_lines(have, reference):
                log(line)
        baselines = {}
        if args.baselines or args.ceiling:
            baselines = baseline_references(bench, specs, args.reference_images, args.seed, log, compute=False)
        half_time = half_cost_time(bench, have)
        if args.ceiling and half_time:
            log(f"a {HALF_COST[0]}x{HALF_COST[1]} trial takes {half_time:.2f} of a default trial's wall time (its "
                "validation passes cost the same)")
        for line in ceiling_lines(bench, rows, reference, baselines, tuple(args.ceiling), half_time):
            log(line)
        return
    if args.scores_only:
        trial_scores(bench, specs, log, blockwise=not args.no_blockwise, half_cost=args.half_cost)
        return
    reference = references(bench, specs, args.reference_images, log, args.reverse)
    log(f"references: val acc {min(reference):.4f}-{max(reference):.4f} "
        f"({(time.perf_counter() - started) / 60:.1f} min so far)")
    if args.baselines:
        baseline_references(bench, specs, args.reference_images, args.seed, log, compute=True)
    if args.references_only:
        return
    trial_scores(bench, specs, log, blockwise=not args.no_blockwise, half_cost=args.half_cost)
    log(f"\n{len(specs)} specs under {budget}; reference val acc {min(reference):.4f}-{max(reference):.4f}; "
        f"s / spec of naswot and synflow is the time of both, with macs and params (known before any score) 0; "
        f"{machine()}; {(time.perf_counter() - started) / 60:.1f} min")
    rows = score_rows(bench, specs, args.reference_images, priors)
    print_table(table(rows, reference))
    log(size_line(bench, rows, reference))
    for line in floor_lines(bench, specs, rows, reference, args.budget_floor):
        log(line)


if __name__ == "__main__":
    main()
