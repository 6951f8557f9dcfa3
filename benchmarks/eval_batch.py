"""Validation passes: seconds of one pass over the validation split at several batch sizes.

    python -m benchmarks.eval_batch [--threads 2]

A trial validates its student several times (`--trial-reports`), and the teachers' targets are
computed once per search, both forward only. On a CPU a large batch can be slower than a small one
(its activations fall out of cache), so the batch size of `train.predict` and of the ensemble's
target cache is a measured choice. Printed: seconds per pass and the ratio to batch 1000 (the
size used before it was measured), for two students of the default space and the two default
teachers, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from nas_kd.data.batches import eval_batches
from nas_kd.data.datasets import load_dataset
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.zoo import teacher_spec

MODELS = {"student 4.2M MACs": Spec.parse("c16|bottleneck_d1_w24_s1_k3_e2|bottleneck_d1_w64_s2_k3_e4_se|"
                                          "bottleneck_d2_w64_s2_k5_e4"),
          "student 37.1M MACs": Spec.parse("c24|basic_d1_w32_s1_k3_e1|bottleneck_d1_w64_s2_k3_e2|basic_d2_w64_s2_k5_e1"),
          "teacher resnet20": teacher_spec("resnet20"), "teacher wrn16_2": teacher_spec("wrn16_2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 500, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=3, help="passes per size; the fastest is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("fashion-mnist")
    print(f"{len(dataset.val)} validation images, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | " + " | ".join(f"batch {b}" for b in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name, spec in MODELS.items():
        model = build(spec, dataset.input_shape, dataset.num_classes).eval()
        seconds = {}
        for size in args.sizes:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.inference_mode():
                    for x, _ in eval_batches(dataset.val, dataset, size):
                        model(x)
                best = min(best, time.perf_counter() - start)
            seconds[size] = best
        base = seconds.get(1000, seconds[args.sizes[0]])
        print(f"| {name} | " + " | ".join(f"{seconds[b]:.2f} s (x{base / seconds[b]:.2f})" for b in args.sizes) + " |")


if __name__ == "__main__":
    main()
