"""The trial-score benchmark's training and its table: each student's reference (the fixed retrain,
read on validation), every trial score of the search on the same students, the baselines'
references, and the ranking statistics of each score (`benchmarks.trial_scores` prints them)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import optuna

from benchmarks.results import machine, settings_id
from benchmarks.retrains import Bench, distill_sid, reference_settings, trial_settings
from benchmarks.rules import counter, hand_made, largest
from benchmarks.stats import kendall, spearman, spearman_interval
from nas_kd.core.config import steps_per_epoch
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Split
from nas_kd.distill.blockwise import BlockwiseScorer, most_accurate
from nas_kd.distill.losses import recipe_features
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nas.objective import PROXY_BATCH, TRIAL_SCORES, TrialContext, proxy_scores, trial_context
from nas_kd.nas.records import CURVE_ATTR
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.pipeline.phases import trial_recipe
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets
from nas_kd.training.train import evaluate


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y on x."""
    return statistics.linear_regression(x, y).slope


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
            model, seconds = retrain(spec, data, bench.ensemble, RetrainRecipe.of(cfg), progress=False, cached=targets)
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
        return trial_context(bench.space, dataset, bench.ensemble, bench.budget, batches, targets,
                             trial_recipe(sub, bench.budget), False, scorer)

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
            value = TRIAL_SCORES["distill"].compute(ctx, trial, spec)
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


def recalibrated_row(bench: Bench, schedule: tuple[int, int]) -> str:
    """The table's row name of the distill score at `schedule` (epochs, images), recalibrated."""
    epochs, images = schedule
    return f"distill {epochs}x{images} recalibrated ({bench.cfg.bn_recalibration} batches)"


def default_row(bench: Bench) -> str:
    """The table's row name of the default score: the first schedule, recalibrated."""
    return recalibrated_row(bench, SCHEDULES[0])


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
