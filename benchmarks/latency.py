"""How well latency can be measured and predicted here, and how poorly MACs stand in for it.

    python -m benchmarks.latency [--specs 50] [--threads 1]

For each shipped search space (resnet, mobilenetv2) at Fashion-MNIST's input (1x28x28, 10
classes), on this machine, with ONNX Runtime (fp32, batch 1, `--threads` intra-op threads):

- repeatability: 10 specs each measured 5 times (a fresh export and session each time; each
  measurement the median of 100 runs): the coefficient of variation of the 5 medians;
- MACs against measured latency: Spearman over `--specs` seeded random specs per space, and over
  both spaces pooled;
- the table predictor against measurement: the space's layers and its calibration networks
  exported and timed with time_blocks.py here (as on a target device), each spec's latency
  predicted from the table, both as the plain layer sum and calibrated (the sum's scale and
  offset fitted to the calibration networks), and compared with its measured latency: the share
  within +-10% (nn-Meter's figure), Spearman, and the mean absolute percentage error. A spec that
  is also a calibration network is left out of this comparison;
- seconds per latency check (export, session, timing), as a trial pays it before training.

Measurements and tables are kept in benchmarks/results/latency.json as they finish, and the
exported layers under --blocks, so a killed run resumes. Timings are only comparable within one
run on an otherwise idle machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.results import RESULTS, ResultsFile, machine, settings_id
from benchmarks.rules import counter
from benchmarks.stats import spearman, spearman_interval
from nas_kd.device.latency import PASSES, RUNS, LatencyTable, measure_latency
from nas_kd.device.layers import export_blocks
from nas_kd.device.time_blocks import time_folder
from nas_kd.nets.space import load_space

SPACES = ("resnet", "mobilenetv2")
INPUT, CLASSES = (1, 28, 28), 10
REPEATS, REPEAT_SPECS = 5, 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=50, help="random specs per space (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--results", type=Path, default=RESULTS / "latency.json")
    parser.add_argument("--blocks", type=Path, default=Path("studies/bench-latency-v3"),
                        help="where the spaces' layers are exported (kept between runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = ResultsFile(args.results)
    # v1 was measured while tests ran on the same cores: its timings are not evidence; v2 timed a
    # single median per model and had no calibration networks
    run = settings_id({"machine": machine(), "threads": args.threads, "runs": RUNS, "passes": PASSES,
                       "input": INPUT, "v": 3})
    print(f"{machine()}; ONNX Runtime {args.threads} thread(s); results key {run}", flush=True)
    pooled_macs: list[float] = []
    pooled_ms: list[float] = []
    rows = []
    for name in SPACES:
        space = load_space(name)
        specs = space.random_specs(args.specs, seed=0)
        macs = [float(counter(INPUT, CLASSES)(s).macs) for s in specs]
        measured, check_seconds = [], []
        for spec in specs:
            key = f"{run}|{name}|{spec}"
            if (entry := results.get("measured", key)) is None:
                start = time.perf_counter()
                ms = measure_latency(spec, INPUT, CLASSES, threads=args.threads)
                entry = {"ms": ms, "seconds": round(time.perf_counter() - start, 3), "machine": machine()}
                results.put("measured", key, entry)
            measured.append(entry["ms"])
            check_seconds.append(entry["seconds"])
        cvs = []
        for spec in specs[:REPEAT_SPECS]:
            key = f"{run}|{name}|{spec}"
            if (entry := results.get("repeats", key)) is None:
                entry = {"ms": [measure_latency(spec, INPUT, CLASSES, threads=args.threads) for _ in range(REPEATS)]}
                results.put("repeats", key, entry)
            cvs.append(statistics.stdev(entry["ms"]) / statistics.mean(entry["ms"]))
        key = f"{run}|{name}"
        folder = args.blocks / name  # kept, so that a killed run times them without exporting again
        if (table_entry := results.get("tables", key)) is None:
            start = time.perf_counter()
            if not (folder / "manifest.json").is_file():
                export_blocks(space, INPUT, CLASSES, folder, progress=lambda m, n=name: print(f"  {n}: {m}", flush=True))
            exported = time.perf_counter() - start
            table = time_folder(folder, args.threads, log=lambda m, n=name: print(f"  {n}: {m}", flush=True))
            table_entry = {"table": table, "export_seconds": round(exported, 1),
                           "time_seconds": round(time.perf_counter() - start - exported, 1)}
            results.put("tables", key, table_entry)
        predictor = LatencyTable.from_data(table_entry["table"], f"{folder}", space, INPUT, CLASSES, "fp32")
        if not predictor.is_calibrated:
            raise SystemExit(f"the {name} table is not calibrated ({predictor.calibration_line()}); export --blocks "
                             "again with this version")
        held_out = [(s, m) for s, m in zip(specs, measured) if str(s) not in predictor.networks]
        print(f"  {name}: {predictor.calibration_line()}; {len(specs) - len(held_out)} of the specs are calibration "
              "networks, left out of the comparison", flush=True)
        predictions = {"sum": [predictor.layer_sum(s) for s, _ in held_out],
                       "calibrated": [predictor.predict(s) for s, _ in held_out]}
        truth = [m for _, m in held_out]
        for kind, predicted in predictions.items():
            errors = [p / m - 1 for p, m in zip(predicted, truth)]
            rows.append({
                "space": name, "predictor": kind, "specs": len(specs), "compared": len(truth),
                "latency_ms": f"{min(measured):.3f}-{max(measured):.3f}",
                "cv_median": statistics.median(cvs), "cv_max": max(cvs),
                "spearman_macs": spearman(macs, measured), "macs_interval": spearman_interval(macs, measured),
                "within_10": sum(abs(e) <= 0.10 for e in errors) / len(errors), "spearman_table": spearman(predicted, truth),
                "mape": statistics.mean(abs(e) for e in errors), "bias": statistics.mean(errors),
                "layers": len(predictor.entries) - 1, "networks": len(predictor.networks),
                "export_s": table_entry["export_seconds"], "time_s": table_entry["time_seconds"],
                "check_s": statistics.median(check_seconds)})
        pooled_macs += macs
        pooled_ms += measured
    print(f"\n{machine()}; ONNX Runtime {args.threads} thread(s), batch 1, fastest of {PASSES} medians of {RUNS} "
          "runs\n")
    print("| space | specs | latency (ms) | CV of 5 repeats, median / max | Spearman MACs vs latency [90%] "
          "| s per latency check |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["predictor"] != "sum":
            continue
        lo, hi = r["macs_interval"]
        print(f"| {r['space']} | {r['specs']} | {r['latency_ms']} | {r['cv_median']:.1%} / {r['cv_max']:.1%} "
              f"| {r['spearman_macs']:.2f} [{lo:.2f}, {hi:.2f}] | {r['check_s']:.2f} |")
    lo, hi = spearman_interval(pooled_macs, pooled_ms)
    print(f"| both, pooled | {len(pooled_ms)} | | | {spearman(pooled_macs, pooled_ms):.2f} [{lo:.2f}, {hi:.2f}] | |\n")
    print("| space | predictor | specs compared | within +-10% | Spearman | mean abs. error (bias) "
          "| layers + networks (export s, time s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['space']} | {r['predictor']} | {r['compared']} | {r['within_10']:.0%} | {r['spearman_table']:.2f} "
              f"| {r['mape']:.1%} ({r['bias']:+.1%}) | {r['layers']} + {r['networks']} ({r['export_s']:.0f}, "
              f"{r['time_s']:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
