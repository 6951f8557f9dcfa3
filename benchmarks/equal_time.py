"""The same time with and without a search, and how to split it: whole runs of the main command
under one `--time-budget`, side by side.

    python -m benchmarks.equal_time --arms search hand-made --seeds 0 --budget 30m --threads 1
    python -m benchmarks.equal_time --table-only

Each arm is one run of `python -m nas_kd.search --flops-budget 50M --time-budget B` in its own
folder (its own study, teacher and target caches), started as a separate process:

- search: the main command as a user runs it with that budget (the search gets
  `SearchConfig.search_share` of the time, the retrain the rest);
- search-20, search-40: the same with `--search-share 0.2` / `0.4` (the split study);
- hand-made: no search, what a user would otherwise do: the hand-made ResNet-20 widened to the
  budget (`--start-from hand-made --trials 1`: it is trained as the study's one trial, then
  retrained, by the same recipe, for all the time that is left).

Arms run at the same time (`--threads` torch threads each), so that each one's time is measured
beside the others' on the same machine. The table gives each run's validation accuracy (what
decides), its test accuracy (printed, never chosen on), its trials and retrain epochs, and its
wall time against the budget. Finished runs are kept in benchmarks/results/equal_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna

from benchmarks.results import RESULTS, ResultsFile, machine, settings_id
from nas_kd.core.units import parse_duration
from nas_kd.pipeline.plan import TIME_ATTR

BUDGET_FLAGS = ("--flops-budget", "50M")
# 2: the retrain re-plans its length after each epoch (train.Deadline); runs of version 1 planned
# it once, from a few timed steps, and are kept beside them; 3: the re-plan ends at the nearest
# whole epoch (version 2 stopped at the last that fitted, up to one epoch short); 4: the retrain's
# first plan does too (version 3 rounded it down, and a training's last epoch is never re-planned)
VERSION = 4
ARMS = {
    "search": (),
    "search-20": ("--search-share", "0.2"),
    "search-40": ("--search-share", "0.4"),
    "hand-made": ("--start-from", "hand-made", "--trials", "1"),
}


def run_arm(arm: str, seed: int, budget: str, threads: int, work: Path) -> dict[str, Any]:
    """One whole run in `work`/ARM-sSEED; its winner's metrics, plan and actual split."""
    folder = work / f"{arm}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a run as a user's first: no study, teacher or target to resume
    folder.mkdir(parents=True)
    name = f"eqt-{arm}-s{seed}"
    argv = [sys.executable, "-m", "nas_kd.search", *BUDGET_FLAGS, "--time-budget", budget, "--seed", str(seed),
            "--study-name", name, "--quiet", *ARMS[arm]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent.parent)}
    started = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        code = subprocess.call(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if code:
        raise SystemExit(f"{arm} seed {seed} failed ({code}); see {folder / 'run.log'}")
    metrics = json.loads((folder / "studies" / name / "winner" / "metrics.json").read_text())
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'studies' / name}.db")
    split = study.user_attrs.get(TIME_ATTR, {})
    return {"arm": arm, "seed": seed, "budget": budget, "budget_seconds": parse_duration(budget),
            "wall_seconds": round(wall, 1), "spec": metrics["spec"], "macs": metrics["macs"],
            "trial": metrics["trial"], "final_epochs": metrics["final_epochs"], "val_acc": metrics["val_acc"],
            "test_acc": metrics["test_acc"], "plan": split.get("plan"), "actual": split.get("actual"),
            "threads": threads, "machine": machine(), "version": VERSION, "commit": commit()}


def key(arm: str, seed: int, budget: str, threads: int = 1) -> str:
    """A run's key in the results file (the torch threads where not one, the first runs' count)."""
    return f"{arm}|{seed}|{budget}|{settings_id({'v': VERSION})}" + (f"|t{threads}" if threads != 1 else "")


def commit() -> str:
    """The code the runs ran: this checkout's commit."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip()


def show(results: ResultsFile) -> None:
    rows = sorted(results.data.get("runs", {}).values(),
                  key=lambda e: (e.get("version", 1), e["budget_seconds"], e["seed"], e["arm"], e["threads"]))
    print("| version | budget | seed | arm | threads | winner MACs | trials | retrain epochs | val acc | test acc | wall | "
          "over budget |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in rows:
        actual = e.get("actual") or {}
        print(f"| {e.get('version', 1)} | {e['budget']} | {e['seed']} | {e['arm']} | {e['threads']} | {e['macs'] / 1e6:.1f}M | "
              f"{actual.get('trials', '')} | "
              f"{e['final_epochs']} | {e['val_acc'] * 100:.2f}% | {e['test_acc'] * 100:.2f}% | "
              f"{e['wall_seconds'] / 60:.1f} min | {e['wall_seconds'] / e['budget_seconds'] - 1:+.1%} |")
    machines = sorted({f"{e['machine']}; {e['threads']} thread(s) a run" for e in rows})
    if machines:
        print("\nmachines: " + "; ".join(machines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", default="30m", help="the --time-budget of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (they run at once)")
    parser.add_argument("--work", type=Path, default=Path("studies/bench-equal-time"))
    parser.add_argument("--results", type=Path, default=RESULTS / "equal_time.json")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of the results")
    args = parser.parse_args()
    results = ResultsFile(args.results)
    todo = [] if args.table_only else [
        (arm, seed) for seed in args.seeds for arm in args.arms
        if results.get("runs", key(arm, seed, args.budget, args.threads)) is None]

    def one(job: tuple[str, int]) -> None:
        arm, seed = job
        entry = run_arm(arm, seed, args.budget, args.threads, args.work)
        results.put("runs", key(arm, seed, args.budget, args.threads), entry)
        print(f"{arm} seed {seed}: val {entry['val_acc']:.4f}, test {entry['test_acc']:.4f}, "
              f"{entry['wall_seconds']:.0f} s", flush=True)

    with ThreadPoolExecutor(max(1, len(todo))) as pool:
        list(pool.map(one, todo))
    results.refresh()
    show(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
