"""What one training step of a trial costs: plain cross-entropy vs KD with cached ensemble targets
vs KD that runs the teachers on every step, measured side by side on the same student.

    python -m benchmarks.trial_cost [--teachers wrn16_2,resnet20] [--steps 20] [--rounds 5]

Teachers are freshly initialised (their speed does not depend on their weights); the batches are
real Fashion-MNIST images. The three kinds of step are interleaved round by round so that drift
of the machine hits all three alike; the table shows the median milliseconds per step and the
ratio to the plain step. Target (issue 2): cached KD <= 1.15x plain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nas_kd.core.config import DistillConfig, SearchConfig, TrainConfig, parse_distill
from nas_kd.core.units import format_count
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import load_dataset
from nas_kd.distill.losses import StudentOutput
from nas_kd.distill.student import criterion_for
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, LiveTargets
from nas_kd.training.train import make_optimizer

STUDENTS = {
    "small (resnet8-like)": "c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1",
    "medium": "c24|basic_d2_w24_s1_k3_e1|bottleneck_d2_w48_s2_k3_e2|basic_d2_w96_s2_k3_e1_se",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default=",".join(SearchConfig().teachers), help="default: the search's")
    parser.add_argument("--distill", default="ce=1,kl=1,hint=1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    recipe = DistillConfig(losses=parse_distill(args.distill))
    dataset = load_dataset("fashion-mnist").to(device)
    n = args.batch_size * args.steps
    split = dataset.train.subset(seeded_subset(len(dataset.train), n, 0).to(device))
    batches = BatchIterator(split, dataset, args.batch_size, seed=0, views=1, augment=False)
    members = []
    for name in args.teachers.split(","):
        model = build(teacher_spec(name), dataset.input_shape, dataset.num_classes).to(device).eval()
        members.append(Teacher(name, model, count(model, dataset.input_shape), 0.0, "untrained"))
    ensemble = Ensemble(members)
    criterion_probe = criterion_for(build(Spec.parse(STUDENTS["small (resnet8-like)"]), dataset.input_shape, 10),
                                    recipe, ensemble.feature_channels)
    start = time.perf_counter()
    cached = CachedTargets(ensemble, batches, criterion_probe.features, progress=False)
    cache_seconds = time.perf_counter() - start
    live = LiveTargets(ensemble, criterion_probe.features)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"teachers: {', '.join(f'{t.name} ({format_count(t.cost.macs)} MACs)' for t in members)}; "
          f"recipe {recipe}; batch {args.batch_size}; {args.rounds} rounds x {args.steps} steps of each kind")
    print(f"building the target cache for {n} images took {cache_seconds:.2f} s "
          f"({cached.nbytes() / 1e6:.1f} MB), once per search\n")
    print(f"{'student':<22} {'MACs':>8} {'plain CE':>10} {'cached KD':>10} {'live KD':>10} {'cached/plain':>13} {'live/plain':>11}")
    for label, text in STUDENTS.items():
        student = build(Spec.parse(text), dataset.input_shape, dataset.num_classes).to(device)
        ms = measure(student, criterion_for(student, recipe, ensemble.feature_channels), list(batches.epoch(0)),
                     {"cached": cached, "live": live}, args.rounds, device)
        macs = count(student, dataset.input_shape).macs
        print(f"{label:<22} {format_count(macs):>8} {ms['plain']:>9.1f}ms {ms['cached']:>9.1f}ms {ms['live']:>9.1f}ms "
              f"{ms['cached'] / ms['plain']:>12.2f}x {ms['live'] / ms['plain']:>10.2f}x")


def measure(student: torch.nn.Module, criterion: torch.nn.Module, batch_list: list, sources: dict,
            rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms per training step of each kind, the kinds interleaved round by round."""
    optimizer = make_optimizer(list(student.named_parameters()) + list(criterion.named_parameters()), TrainConfig())

    def plain(batch) -> torch.Tensor:
        return F.cross_entropy(student(batch.x), batch.y)

    def kd(source):
        def step(batch) -> torch.Tensor:
            feats = student.forward_features(batch.x)
            return criterion(StudentOutput(student.forward_head(feats[-1]), feats), source(batch), batch.y)
        return step

    kinds = {"plain": plain, **{name: kd(source) for name, source in sources.items()}}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(rounds + 1):  # round 0 warms up
        for kind, loss_of in kinds.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for batch in batch_list:
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[kind].append((time.perf_counter() - t0) / len(batch_list) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
