"""Teacher schedules compared on the validation split: precision, augmentation, label smoothing.

    python -m benchmarks.teacher_schedules [--arch resnet20] [--epochs 3] [--seed 0]

Each arm trains the same teacher with `python -m nas_kd.teachers train`'s loop (one-cycle SGD,
batch 128, peak lr 0.2) for the same epochs and seed, and differs from the first in one setting:

    fp32              float32, no augmentation, no label smoothing
    bf16              bfloat16 autocast: is it safe (the same validation accuracy)?
    bf16+augment      padding-crop (2 px) and flips
    bf16+augment+ls   and label smoothing 0.1

It prints validation accuracy and seconds per epoch; the test set is never read. Finished arms
are kept in --results (JSON) and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from nas_kd.core.config import TrainConfig
from nas_kd.data.datasets import load_dataset
from nas_kd.teaching.cache import train_teacher
from nas_kd.training.train import evaluate

ARMS = {
    "fp32": TrainConfig(),
    "bf16": TrainConfig(bf16=True),
    "bf16+augment": TrainConfig(bf16=True, augment=True),
    "bf16+augment+ls": TrainConfig(bf16=True, augment=True, label_smoothing=0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--results", type=Path, default=Path("studies/teacher_schedules.json"))
    args = parser.parse_args()
    dataset = load_dataset("fashion-mnist")
    done = json.loads(args.results.read_text()) if args.results.is_file() else {}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.arch}, {args.epochs} epochs, seed {args.seed}")
    print(f"{'arm':<18} {'val acc':>8} {'s/epoch':>8}")
    for arm in args.arms.split(","):
        key = f"{args.arch}/{args.epochs}/{args.seed}/{arm}"
        if key not in done:
            model, seconds = train_teacher(args.arch, dataset, args.epochs, args.seed, ARMS[arm],
                                           torch.device("cpu"), progress=False)
            done[key] = {"val_acc": evaluate(model, dataset.val, dataset), "s_per_epoch": seconds / args.epochs}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(done, indent=1))
        r = done[key]
        print(f"{arm:<18} {r['val_acc']:>8.4f} {r['s_per_epoch']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
