"""How well latency can be measured and predicted here, and how poorly MACs stand in for it.

    python benchmarks/latency.py [--specs 50] [--threads 1]

For each shipped search space (resnet, mobilenetv2) at Fashion-MNIST's input (1x28x28, 10
classes), on this machine, with ONNX Runtime (fp32, batch 1, `--threads` intra-op threads):

- repeatability: 10 specs each measured 5 times (a fresh export and session each time; each
  measurement the median of 100 runs): the coefficient of variation of the 5 medians;
- MACs against measured latency: Spearman over `--specs` seeded random specs per space, and over
  both spaces pooled;
- the table predictor against measurement: the space's layers exported and timed with
  time_blocks.py here (as on a target device), each spec's latency predicted from the table and
  compared with its measured latency: the share within +-10% (nn-Meter's figure), Spearman, and
  the mean absolute percentage error.

Measurements and tables are kept in benchmarks/results/latency.json as they finish, and the
exported layers under --blocks, so a killed run resumes. Timings are only comparable within one
run on an otherwise idle machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_cache import RESULTS, ResultsFile, machine, settings_id  # noqa: E402
from trial_scores import bootstrap_interval, spearman  # noqa: E402

from nas_kd.arch import build  # noqa: E402
from nas_kd.cost import count  # noqa: E402
from nas_kd.latency import RUNS, LatencyTable, export_blocks, measure_latency  # noqa: E402
from nas_kd.space import load_space  # noqa: E402
from nas_kd.time_blocks import time_folder  # noqa: E402

SPACES = ("resnet", "mobilenetv2")
INPUT, CLASSES = (1, 28, 28), 10
REPEATS, REPEAT_SPECS = 5, 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=50, help="random specs per space (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--results", type=Path, default=RESULTS / "latency.json")
    parser.add_argument("--blocks", type=Path, default=Path("studies/bench-latency"),
                        help="where the spaces' layers are exported (kept between runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = ResultsFile(args.results)
    # v1 was measured while tests ran on the same cores: its timings are not evidence
    run = settings_id({"machine": machine(), "threads": args.threads, "runs": RUNS, "input": INPUT, "v": 2})
    print(f"{machine()}; ONNX Runtime {args.threads} thread(s); results key {run}", flush=True)
    pooled_macs: list[float] = []
    pooled_ms: list[float] = []
    rows = []
    for name in SPACES:
        space = load_space(name)
        specs = space.random_specs(args.specs, seed=0)
        macs = [float(count(build(s, INPUT, CLASSES, channels_last=False), INPUT).macs) for s in specs]
        measured = []
        for spec in specs:
            key = f"{run}|{name}|{spec}"
            if (entry := results.get("measured", key)) is None:
                entry = {"ms": measure_latency(spec, INPUT, CLASSES, threads=args.threads), "machine": machine()}
                results.put("measured", key, entry)
            measured.append(entry["ms"])
        cvs = []
        for spec in specs[:REPEAT_SPECS]:
            key = f"{run}|{name}|{spec}"
            if (entry := results.get("repeats", key)) is None:
                entry = {"ms": [measure_latency(spec, INPUT, CLASSES, threads=args.threads) for _ in range(REPEATS)]}
                results.put("repeats", key, entry)
            cvs.append(statistics.stdev(entry["ms"]) / statistics.mean(entry["ms"]))
        key = f"{run}|{name}"
        if (table_entry := results.get("tables", key)) is None:
            folder = args.blocks / name  # kept, so that a killed run times them without exporting again
            start = time.perf_counter()
            if not (folder / "manifest.json").is_file():
                export_blocks(space, INPUT, CLASSES, folder, progress=lambda m, n=name: print(f"  {n}: {m}", flush=True))
            exported = time.perf_counter() - start
            table = time_folder(folder, args.threads, log=lambda m, n=name: print(f"  {n}: {m}", flush=True))
            table_entry = {"table": table, "export_seconds": round(exported, 1),
                           "time_seconds": round(time.perf_counter() - start - exported, 1)}
            results.put("tables", key, table_entry)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(table_entry["table"], f)
        predictor = LatencyTable.load(f.name, space, INPUT, CLASSES, "fp32")
        Path(f.name).unlink()
        predicted = [predictor.predict(s) for s in specs]
        errors = [p / m - 1 for p, m in zip(predicted, measured)]
        within = sum(abs(e) <= 0.10 for e in errors) / len(errors)
        rows.append({
            "space": name, "specs": len(specs), "latency_ms": f"{min(measured):.3f}-{max(measured):.3f}",
            "cv_median": statistics.median(cvs), "cv_max": max(cvs),
            "spearman_macs": spearman(macs, measured), "macs_interval": bootstrap_interval(macs, measured, spearman),
            "within_10": within, "spearman_table": spearman(predicted, measured),
            "mape": statistics.mean(abs(e) for e in errors), "bias": statistics.mean(errors),
            "layers": len(predictor.entries) - 1, "export_s": table_entry["export_seconds"],
            "time_s": table_entry["time_seconds"]})
        pooled_macs += macs
        pooled_ms += measured
    print(f"\n{machine()}; ONNX Runtime {args.threads} thread(s), batch 1, median of {RUNS} runs\n")
    print("| space | specs | latency (ms) | CV of 5 repeats, median / max | Spearman MACs vs latency "
          "| table: within +-10% | table: Spearman | table: mean abs. error (bias) | layers (export s, time s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["macs_interval"]
        print(f"| {r['space']} | {r['specs']} | {r['latency_ms']} | {r['cv_median']:.1%} / {r['cv_max']:.1%} "
              f"| {r['spearman_macs']:.2f} [{lo:.2f}, {hi:.2f}] | {r['within_10']:.0%} | {r['spearman_table']:.2f} "
              f"| {r['mape']:.1%} ({r['bias']:+.1%}) | {r['layers']} ({r['export_s']:.0f}, {r['time_s']:.0f}) |")
    lo, hi = bootstrap_interval(pooled_macs, pooled_ms, spearman)
    print(f"| both, pooled | {len(pooled_ms)} | | | {spearman(pooled_macs, pooled_ms):.2f} [{lo:.2f}, {hi:.2f}] | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
