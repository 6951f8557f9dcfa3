"""int8 on this CPU: every quantization setting of `nas_kd.device.int8` on the shipped teachers and on
students, accuracy, agreement with fp32 and latency, side by side in one run.

    python -m benchmarks.int8 [--students SPEC ...] [--epochs 1]

Models: the two shipped Fashion-MNIST teachers (resnet20, wrn16_2) and each student spec given
(default: the main command's 37.1M-MAC winner), distilled here from the shipped ensemble for
`--epochs` epochs with the search's recipe (a short retrain: its weights are of the kind int8
must hold for, not the 11-epoch winner's). Each is exported once to ONNX (dynamic batch, as
delivered) and quantized with every setting (`nas_kd.device.int8.SETTINGS`) on the export's 512 seeded
training images; each int8 model is run on the validation split (agreement with fp32, what the
export chooses by) and on the test split (accuracy, for this table only), and its latency taken
like the export's (one thread, batch 1, the fastest of 3 medians of 100 runs), the fp32 model's
beside it in the same run. Results go to `benchmarks/results/int8.json` under this machine's
instruction set, so runs on CPUs with and without VNNI sit side by side in one file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import torch

from benchmarks.results import RESULTS, ResultsFile, machine
from nas_kd.core.config import SearchConfig
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.device.convert import onnx_logits, quantize_int8, to_onnx
from nas_kd.device.export import calibration_images, split_inputs
from nas_kd.device.int8 import SETTINGS, instruction_set
from nas_kd.device.time_blocks import latency_ms, make_session
from nas_kd.distill.losses import recipe_features
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nets.arch import Spec
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets, ensemble_from_config

WINNER = "c24|basic_d1_w32_s1_k3_e1|bottleneck_d1_w64_s2_k3_e2|basic_d2_w64_s2_k5_e1"  # the main command's 37.1M winner


def measure(name: str, model: torch.nn.Module, dataset: Dataset, results: ResultsFile, isa: str) -> None:
    fp32 = to_onnx(model, dataset.input_shape)
    val, test = split_inputs(dataset, "val"), split_inputs(dataset)
    val_ref, test_ref = onnx_logits(fp32, val).argmax(1), onnx_logits(fp32, test).argmax(1)
    labels = dataset.test.y.cpu().numpy()
    calibration = calibration_images(dataset, 0)
    row = {"fp32": {"test_acc": float((test_ref == labels).mean()), "latency_ms": None}}
    models = {"fp32": fp32}
    for key, s in SETTINGS.items():
        models[key] = quantize_int8(fp32, calibration, activation=s.activation, weight=s.weight,
                                    reduce_range=s.reduce_range)
        row[key] = {"settings": s.describe(),
                    "val_agreement": float((onnx_logits(models[key], val).argmax(1) == val_ref).mean()),
                    "test_agreement": float((onnx_logits(models[key], test).argmax(1) == test_ref).mean()),
                    "test_acc": float((onnx_logits(models[key], test).argmax(1) == labels).mean())}
    # latencies in rounds over every model, so a slow spell of the machine hits one round of all
    sessions = {k: make_session(m, 1) for k, m in models.items()}
    best: dict[str, float] = {}
    for _ in range(3):
        for k, session in sessions.items():
            best[k] = min(best.get(k, float("inf")), latency_ms(session, passes=1))
    for k in models:
        row[k]["latency_ms"] = round(best[k], 4)
        row[k]["speedup"] = round(best["fp32"] / best[k], 3)
    results.put("models", f"{name}|{isa}", {"model": name, "instruction_set": isa, "rows": row, "machine": machine()})
    print_rows(name, isa, row)


def print_rows(name: str, isa: str, row: dict) -> None:
    print(f"\n{name} on {isa}")
    print("| model | val agreement | test agreement | test acc | ms (1 thread) | speed vs fp32 |")
    print("|---|---|---|---|---|---|")
    for k, r in row.items():
        agree = (f"{r['val_agreement']:.2%} | {r['test_agreement']:.2%}" if "val_agreement" in r else "- | -")
        print(f"| {k} | {agree} | {r['test_acc']:.2%} | {r['latency_ms']:.3f} | {r['speedup']:.2f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="*", default=[WINNER], metavar="SPEC")
    parser.add_argument("--epochs", type=int, default=1, help="distillation epochs of each student (default 1)")
    parser.add_argument("--results", type=Path, default=RESULTS / "int8.json")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    results = ResultsFile(args.results)
    if args.table_only:
        for entry in results.data.get("models", {}).values():
            print_rows(entry["model"], entry["instruction_set"], entry["rows"])
        return 0
    isa = instruction_set()
    print(f"{machine()}; {isa}", flush=True)
    cfg = SearchConfig(cache_dir="studies/cache")
    dataset = load_dataset(cfg.dataset)
    ensemble = ensemble_from_config(cfg, dataset, progress=False, log=print)
    for teacher in ensemble.members:
        measure(f"teacher {teacher.name}", teacher.model, dataset, results, isa)
    batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=1)
    targets = CachedTargets(ensemble, batches, recipe_features(cfg.distill.weights()), progress=False)
    for spec in args.students:
        model, _ = retrain(Spec.parse(spec), dataset, ensemble, RetrainRecipe.of(cfg), args.epochs, False, targets)
        measure(f"student {spec} ({args.epochs} epoch(s))", model.eval(), dataset, results, isa)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
