"""`python -m nas_kd.teachers train|list|ship`: train a teacher for any dataset, see what is trained.

`train` runs a full schedule (one-cycle SGD, optional augmentation, label smoothing, bfloat16
autocast) with a checkpoint after every epoch: the same command, run again after a kill,
resumes where it stopped. It writes into the cache the search reads (`OUT_DIR/cache/teachers/`),
with metadata that describes the teacher completely (architecture, dataset fingerprint,
schedule, seed, validation and test accuracy, versions and the command that made it).
`list` shows the shipped and cached teachers. `ship` is for nas_kd's developers: it copies a
cached teacher into the package (float16 when that changes no validation or test prediction).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from nas_kd.cli import base_parser, fail, number, quiet_libraries
from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.core.progress import log
from nas_kd.core.units import format_count
from nas_kd.data.datasets import dataset_names, load_dataset
from nas_kd.nets.arch import build
from nas_kd.nets.weights import read_metadata, save_model
from nas_kd.nets.zoo import TEACHERS, teacher_cost, teacher_spec
from nas_kd.teaching import cache as teacher_cache
from nas_kd.teaching.cache import (
    FORMAT,
    TeacherFile,
    cache_file,
    dataset_slug,
    load_teacher_file,
    partial_file,
    save_teacher,
    teacher_files,
    train_teacher,
)
from nas_kd.training.train import Checkpoint, evaluate, predict, resolve_device

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = base_parser("python -m nas_kd.teachers", "Train, list and ship the teachers the search distils from.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one teacher (resumable), into the cache the search reads",
                       description="Train teacher ARCH on dataset D with cross-entropy; a checkpoint after every "
                                   "epoch lets the same command resume a killed run.")
    t.add_argument("--dataset", default="fashion-mnist",
                   help=f"{', '.join(dataset_names())}, or folder:PATH (default fashion-mnist)")
    t.add_argument("--data-dir", help="where the dataset's files are (default: the dataset's own place)")
    t.add_argument("--arch", required=True, help=f"teacher architecture; known: {', '.join(TEACHERS)}")
    t.add_argument("--epochs", type=number(int, 1), required=True)
    t.add_argument("--augment", action="store_true", help="padding-crop (and flips where the dataset allows them)")
    t.add_argument("--label-smoothing", type=number(float, 0.0, 1.0), default=0.0)
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the forward pass (float32 weights)")
    t.add_argument("--lr", type=number(float, 1e-9), default=DEFAULTS.lr,
                   help=f"peak learning rate of the one-cycle SGD schedule (default {DEFAULTS.lr:g})")
    t.add_argument("--batch-size", type=number(int, 2), default=DEFAULTS.batch_size)
    t.add_argument("--weight-decay", type=number(float, 0.0), default=DEFAULTS.weight_decay)
    t.add_argument("--warmup", type=number(float, 0.0, 1.0), default=DEFAULTS.warmup,
                   help=f"fraction of the steps with a rising learning rate (default {DEFAULTS.warmup:g})")
    t.add_argument("--seed", type=number(int, 0), default=0)
    t.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    t.add_argument("--threads", type=number(int, 1), help="CPU threads (default: torch's choice)")
    _cache_flags(t)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    ls = sub.add_parser("list", help="the shipped and cached teachers, with datasets, costs and accuracies")
    _cache_flags(ls)

    s = sub.add_parser("ship", help="(nas_kd developers) copy a cached teacher into the package")
    s.add_argument("path", type=Path, help="a teacher file written by `train`")
    s.add_argument("--data-dir", help="where the dataset's files are")
    s.add_argument("--to", type=Path, help=f"destination folder (default {teacher_cache.SHIPPED_TEACHERS})")
    return p


def _cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="studies", help="the search's output folder (default studies)")
    p.add_argument("--cache-dir", help="where trained teachers are cached (default OUT_DIR/cache)")


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(args.out_dir) / "cache"


def train(args: argparse.Namespace, argv: list[str]) -> int:
    teacher_spec(args.arch)  # an unknown name fails before the data loads
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                      label_smoothing=args.label_smoothing, augment=args.augment, bf16=args.bf16)
    dataset = load_dataset(args.dataset, Path(args.data_dir) if args.data_dir else None).to(device)
    final = cache_file(args.arch, dataset, args.epochs, args.seed, cfg, _cache_dir(args))
    if final.is_file():
        meta = read_metadata(final)
        log(f"teacher {args.arch} is already trained: {final} (val acc {meta.get('val_acc', '?')})")
        return 0
    checkpoint = Checkpoint(partial_file(final))
    state = checkpoint.load()
    if state is not None:
        log(f"resuming from {checkpoint.path}: epoch {state['epoch'] + 1} of {args.epochs} done")
    cost = teacher_cost(args.arch, dataset.input_shape, dataset.num_classes)
    log(f"teacher {args.arch}: {format_count(cost.macs)} MACs, {format_count(cost.params)} params; "
        f"{dataset.name} {len(dataset.train)} train / {len(dataset.val)} val; {args.epochs} epochs, "
        f"lr {cfg.lr:g}, batch {cfg.batch_size}, augment {cfg.augment}, label smoothing {cfg.label_smoothing:g}, "
        f"bf16 {cfg.bf16}; checkpoint {checkpoint.path}")
    last = time.perf_counter()

    def on_epoch(model: torch.nn.Module, epoch: int) -> None:
        nonlocal last
        now = time.perf_counter()
        log(f"teacher {args.arch} epoch {epoch + 1}/{args.epochs}: val acc {evaluate(model, dataset.val, dataset):.4f} "
            f"({now - last:.0f} s)")
        last = time.perf_counter()

    model, seconds = train_teacher(args.arch, dataset, args.epochs, args.seed, cfg, device,
                                   progress=not args.quiet, checkpoint=checkpoint, on_epoch=on_epoch)
    val_acc, test_acc = save_teacher(model, final, args.arch, dataset, args.epochs, args.seed, cfg, cost, seconds,
                                     "python -m nas_kd.teachers " + shlex.join(argv))
    checkpoint.remove()
    log(f"teacher {args.arch}: val acc {val_acc:.4f}, test acc {test_acc:.4f}, {seconds / 60:.1f} min of training; "
        f"written to {final}")
    return 0


def _row(f: TeacherFile) -> list[str]:
    m = f.meta
    cost = (f"{format_count(int(m['macs']))} MACs, {format_count(int(m['params']))} params"
            if "macs" in m and "params" in m else "?")
    acc = lambda key: f"{float(m[key]):.4f}" if key in m else "?"  # noqa: E731
    return ["shipped" if f.shipped else "cache", f.arch, m.get("dataset", "?"), m.get("data_fingerprint", "?"), cost,
            m.get("epochs", "?"), acc("val_acc"), acc("test_acc"), str(f.path)]


def list_teachers(args: argparse.Namespace) -> int:
    cache = _cache_dir(args) / "teachers"
    files = teacher_files(teacher_cache.SHIPPED_TEACHERS, shipped=True) + teacher_files(cache, shipped=False)
    rows = [["source", "arch", "dataset", "fingerprint", "cost", "epochs", "val acc", "test acc", "path"]]
    rows += [_row(f) for f in files]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if len(rows) == 1:
        print(f"(no teachers: none shipped in {teacher_cache.SHIPPED_TEACHERS}, none cached in {cache})")
    for partial in sorted((cache / "partial").glob("*.pt")) if (cache / "partial").is_dir() else []:
        print(f"in progress: {partial} (run its `train` command again to resume)")
    return 0


def ship(args: argparse.Namespace) -> int:
    """Copy a cached teacher into the package: float16 if that changes no prediction on the val
    and test splits (checked here, image by image), else float32."""
    meta = read_metadata(args.path)
    if meta.get("format") != FORMAT or not {"arch", "dataset", "data_fingerprint"} <= set(meta):
        raise InputError(f"{args.path} is not a teacher written by `python -m nas_kd.teachers train` "
                         f"(metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    source = TeacherFile(args.path, meta, shipped=False)
    dataset = load_dataset(meta["dataset"], Path(args.data_dir) if args.data_dir else None)
    if dataset.fingerprint() != meta.get("data_fingerprint"):
        raise InputError(f"{args.path} was trained on other data (fingerprint {meta.get('data_fingerprint')}, "
                         f"loaded {dataset.fingerprint()})")
    model = build(teacher_spec(meta["arch"]), dataset.input_shape, dataset.num_classes)
    load_teacher_file(source, model)
    half = build(teacher_spec(meta["arch"]), dataset.input_shape, dataset.num_classes)
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    splits = (dataset.val, dataset.test)
    full, rounded = ([predict(m, split, dataset).argmax(1) for split in splits] for m in (model, half))
    same = all(torch.equal(a, b) for a, b in zip(full, rounded))
    dtype = torch.float16 if same else None
    val_acc, test_acc = ((p == split.y).float().mean().item() for p, split in zip(rounded if same else full, splits))
    out = (args.to or teacher_cache.SHIPPED_TEACHERS) / f"{meta['arch']}-{dataset_slug(meta['dataset'])}.safetensors"
    save_model(half if same else model, out, {**meta, "val_acc": f"{val_acc:.6f}", "test_acc": f"{test_acc:.6f}",
                                              "storage": "float16" if same else "float32"}, dtype=dtype)
    log(f"shipped {out} ({'float16' if same else 'float32: float16 changed a prediction'}), "
        f"{out.stat().st_size / 1e6:.2f} MB, val acc {val_acc:.4f}, test acc {test_acc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        if args.command == "train":
            return train(args, argv)
        if args.command == "list":
            return list_teachers(args)
        return ship(args)
    except InputError as e:
        return fail(str(e))
    except FloatingPointError as e:  # fit's check of every step's loss
        return fail(f"{e}: the training diverged; lower --lr (it was {args.lr:g}) and run again "
                    "(delete the checkpoint under partial/ to start from scratch)")
    except KeyboardInterrupt:
        print("\ninterrupted: every finished epoch is in the checkpoint; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
