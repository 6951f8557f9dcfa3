"""What bfloat16 autocast buys per training step: float32 vs bf16 (`TrainConfig.bf16`), side by
side on the same networks and real batches.

    python -m benchmarks.bf16_step [--nets wrn16_2,resnet20,small,ablation] [--steps 10] [--rounds 3]

Each network takes cross-entropy SGD steps (channels_last, the loop of `train.fit`) on real
Fashion-MNIST batches of 128; float32 and bf16 steps are interleaved round by round, so drift of
the machine hits both alike. The table shows the median milliseconds per step of each and their
ratio. Whether bf16 is *safe* (the same accuracy) is measured by benchmarks.teacher_schedules.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nas_kd.core.config import TrainConfig
from nas_kd.core.units import format_count
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import load_dataset
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.nets.zoo import TEACHERS, teacher_spec
from nas_kd.training.train import make_optimizer

STUDENTS = {
    "small": "c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1",
    "ablation": "c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1|basic_d1_w32_s2_k3_e1",
    "inverted": "c16|inverted_d2_w24_s1_k3_e4|inverted_d2_w48_s2_k3_e4|inverted_d2_w96_s2_k3_e4",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="wrn16_2,resnet20,small,ablation,inverted",
                        help=f"teachers ({', '.join(TEACHERS)}) or students ({', '.join(STUDENTS)})")
    parser.add_argument("--steps", type=int, default=10, help="steps of each precision per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = load_dataset("fashion-mnist")
    batches = list(BatchIterator(dataset.train, dataset, 128, 0, augment=True).epoch(0))[:args.steps]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'network':<10} {'MACs':>8} {'fp32 ms/step':>13} {'bf16 ms/step':>13} {'speed-up':>9}")
    for name in args.nets.split(","):
        spec = Spec.parse(STUDENTS[name]) if name in STUDENTS else teacher_spec(name)
        macs = count(build(spec, dataset.input_shape, 10, channels_last=False), dataset.input_shape).macs
        model = build(spec, dataset.input_shape, 10)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds + 1):  # round 0 warms up both paths
            for bf16 in (False, True):
                cfg = TrainConfig(bf16=bf16)
                optimizer = make_optimizer(model.named_parameters(), cfg)
                start = time.perf_counter()
                for batch in batches:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                        loss = F.cross_entropy(model(batch.x), batch.y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                if r:
                    times[bf16].append((time.perf_counter() - start) / len(batches) * 1000)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<10} {format_count(macs):>8} {fp32:>13.1f} {bf16:>13.1f} {fp32 / bf16:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
