"""What one ONNX export of a student costs with the exporter's translation table built on every
call (torch's way) and built once per process (`nas_kd.device.convert.reused_torchlib_table`),
measured side by side on the same students.

    python -m benchmarks.onnx_export [--specs 6] [--rounds 3]

Random students of the shipped resnet space at Fashion-MNIST's input; each round exports every
student both ways, alternating which goes first, so that drift of the machine hits both alike.
A latency-budget search exports every candidate it times, and a latency table every block.
The table shows the median seconds per export, the ratio, and whether the bytes were the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks.results import machine
from nas_kd.device.convert import reused_torchlib_table, to_onnx
from nas_kd.nets.arch import build
from nas_kd.nets.space import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with reused_torchlib_table() as reusable:
        if not reusable:
            raise SystemExit("this torch has no hook for the exporter's table: nothing to compare")
    shape = (1, 28, 28)
    models = [build(spec, shape, 10) for spec in load_space("resnet").random_specs(args.specs, args.seed)]
    to_onnx(models[0], shape)  # the exporter's own first-call costs, and the kept table, out of the timing
    ways = {"built every export": False, "built once": True}
    times: dict[str, list[float]] = {way: [] for way in ways}
    same = True
    for r in range(args.rounds):
        for i, model in enumerate(models):
            order = list(ways) if (r + i) % 2 == 0 else list(reversed(ways))
            outputs = {}
            for way in order:
                start = time.perf_counter()
                outputs[way] = to_onnx(model, shape, reuse_table=ways[way])
                times[way].append(time.perf_counter() - start)
            same &= outputs["built every export"] == outputs["built once"]
    base = statistics.median(times["built every export"])
    print(f"{machine()}; {args.specs} students x {args.rounds} rounds")
    print("| translation table | median s per export | ratio |")
    print("|---|---|---|")
    for way, values in times.items():
        median = statistics.median(values)
        print(f"| {way} | {median:.3f} | {median / base:.2f}x |")
    print(f"exported bytes identical: {same}")


if __name__ == "__main__":
    main()
