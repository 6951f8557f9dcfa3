"""Small real datasets: do the teachers and the winner learn from about 1,400 images?

Builds a balanced, seeded Fashion-MNIST image folder (1,400 training and 500 test images as PNG
files; nas_kd carves its validation split from the training images), then measures on it:

- plain CNN: ResNet-20 trained with cross-entropy alone, one-cycle SGD at the search's defaults
  (batch 128, lr 0.1, no augmentation) for 1,500 and 3,000 optimizer steps, to show where plain
  training converges on this split;
- the main command, `python -m nas_kd.search --dataset folder:DIR --flops-budget 50M` with its
  default teachers (trained here, none ship for this data), before issue 11's schedule floors
  (`--min-steps 0 --teacher-min-gain 0`: the old behaviour) and with the defaults.

Every arm's figures land in benchmarks/results/small_data.json as it finishes, so a run resumes.

    python -m benchmarks.small_data [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.results import RESULTS, ResultsFile, machine
from nas_kd.core.config import TrainConfig
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import load_dataset, load_fashion_mnist
from nas_kd.nets.arch import build
from nas_kd.nets.zoo import teacher_spec
from nas_kd.training.train import evaluate, fit

TRAIN_PER_CLASS, TEST_PER_CLASS = 140, 50


def write_folder(root: Path, seed: int = 0) -> Path:
    """PATH/train/<class>/*.png and PATH/test/<class>/*.png from Fashion-MNIST's training and test
    files (the Debian package's), image i of a file saved as <i>.png."""
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(seed)
    raw = load_fashion_mnist(None)
    for split, data, per_class in (("train", raw.train, TRAIN_PER_CLASS), ("test", raw.test, TEST_PER_CLASS)):
        x, y = data.x[:, 0].numpy(), data.y.numpy()  # (N, 28, 28) uint8, (N,)
        for c in range(10):
            chosen = rng.choice(np.flatnonzero(y == c), per_class, replace=False)
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(x[i], "L").save(root / split / f"class{c}" / f"{i:05d}.png")
    return root


def plain_cnn(folder: Path, steps: int, seed: int = 0) -> dict:
    dataset = load_dataset(f"folder:{folder}")
    cfg = TrainConfig()
    torch.manual_seed(seed)
    model = build(teacher_spec("resnet20"), dataset.input_shape, dataset.num_classes)
    batches = BatchIterator(dataset.train, dataset, cfg.batch_size, seed, views=1)
    epochs = -(-steps // len(batches))
    seconds = fit(model, batches, lambda b: F.cross_entropy(model(b.x), b.y), cfg, epochs, progress=False)
    return {"arch": "resnet20", "steps": epochs * len(batches), "epochs": epochs,
            "val_acc": evaluate(model, dataset.val, dataset), "test_acc": evaluate(model, dataset.test, dataset),
            "seconds": round(seconds, 1)}


def main_command(folder: Path, work: Path, extra: list[str], name: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "nas_kd.search", "--dataset", f"folder:{folder}", "--flops-budget", "50M",
           "--study-name", name, "--quiet", *extra]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    out: dict = {"command": " ".join(cmd[1:]), "exit": result.returncode, "seconds": round(seconds, 1),
                 "last_line": (result.stderr.strip().splitlines() or [""])[-1]}
    if result.returncode != 0:
        return out
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'studies' / (name + '.db')}")
    info, winner = study.user_attrs["nas_kd"], study.user_attrs["winner"]
    out.update({"schedule": next((line for line in result.stderr.splitlines() if "schedule:" in line), ""),
                "teachers": {t["name"]: {"val_acc": t["val_acc"], "test_acc": winner["teachers_test_acc"][t["name"]]}
                             for t in info["teachers"]},
                "ensemble_val_acc": info["ensemble"]["val_acc"], "ensemble_test_acc": winner["ensemble_test_acc"],
                "winner_spec": winner["spec"], "winner_macs": winner["macs"], "winner_val_acc": winner["val_acc"],
                "winner_test_acc": winner["test_acc"], "final_epochs": winner["final_epochs"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("studies/bench-small-data"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--arms", nargs="+", default=["plain-1500", "plain-3000", "search-old", "search-new"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(RESULTS / "small_data.json")
    folder = write_folder(args.work.resolve() / "fashion-1400")
    print(f"{machine()}; data {folder}", flush=True)
    for arm in args.arms:
        if results.get("arms", arm) is None:
            if arm.startswith("plain-"):
                entry = plain_cnn(folder, int(arm.split("-")[1]))
            else:
                extra = ["--min-steps", "0", "--teacher-min-gain", "0"] if arm == "search-old" else []
                entry = main_command(folder, args.work.resolve() / arm, extra, arm)
            results.put("arms", arm, {**entry, "machine": machine()})
        print(arm, json.dumps(results.get("arms", arm)), flush=True)


if __name__ == "__main__":
    main()
