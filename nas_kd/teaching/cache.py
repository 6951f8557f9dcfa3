"""Trained teachers on disk: the cache of teachers trained once and reused, the shipped ones, and
the loading, checking and healing of their files.

A teacher is trained once and cached under a key of everything that determines it
(architecture, dataset fingerprint, epochs, seed, schedule); later searches load it. Training
holds a lock on the cache entry, and a cache file that cannot be loaded is moved aside.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.core.config import SearchConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.core.versions import versions
from nas_kd.data.batches import Batch, BatchIterator
from nas_kd.data.datasets import Dataset
from nas_kd.nets.arch import Network, build
from nas_kd.nets.cost import Cost
from nas_kd.nets.weights import load_state, load_weights, move_aside, read_metadata, save_model, weights_digest
from nas_kd.nets.zoo import teacher_cost, teacher_spec
from nas_kd.training.train import Checkpoint, accuracy, evaluate, fit, predict


@dataclass
class Teacher:
    name: str
    model: Network
    cost: Cost
    val_acc: float
    source: str  # "trained", "shipped", "cache" or the user's checkpoint path
    val_logits: torch.Tensor | None = None  # (N_val, K), kept so the ensemble's figure costs nothing
    path: str | None = None  # the file its weights came from (or were written to)
    digest: str | None = None  # weights_digest of its float32 state: which weights a study distilled from


FORMAT = "nas_kd.teacher"
SHIPPED_TEACHERS = Path(__file__).resolve().parent.parent / "shipped"  # weights that come with the package


def cache_key(name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig) -> str:
    blob = json.dumps({"spec": str(teacher_spec(name)), "dataset": dataset.name, "data": dataset.fingerprint(),
                       "epochs": epochs, "seed": seed, "train": cfg.__dict__, "format": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cache_file(name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig, cache_dir: Path) -> Path:
    """Where a teacher trained with exactly these settings lives in the cache."""
    key = cache_key(name, dataset, epochs, seed, cfg)
    return cache_dir / "teachers" / f"{name}-{dataset_slug(dataset.name)}-{key}.safetensors"


def dataset_slug(name: str) -> str:
    """A dataset name as part of a file name ('folder:/a/b' -> 'folder__a_b')."""
    return name.replace(":", "_").replace("/", "_")


def partial_file(final: Path) -> Path:
    """The per-epoch training checkpoint of the teacher that will be written to `final`."""
    return final.parent / "partial" / f"{final.stem}.pt"


def train_teacher(name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig,
                  device: torch.device, progress: bool = True, checkpoint: Checkpoint | None = None,
                  on_epoch: Callable[[Network, int], None] | None = None) -> tuple[Network, float]:
    """Train teacher `name` on the train split with cross-entropy; returns it and the seconds spent.
    With `checkpoint`, every epoch is saved there and a saved run is resumed (see `train.fit`)."""
    torch.manual_seed(seed)
    model = build(teacher_spec(name), dataset.input_shape, dataset.num_classes).to(device)
    batches = BatchIterator(dataset.train, dataset, cfg.batch_size, seed, views=None, augment=cfg.augment)

    def step(batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.x), batch.y, label_smoothing=cfg.label_smoothing)

    seconds = fit(model, batches, step, cfg, epochs, desc=f"teacher {name}", progress=progress, checkpoint=checkpoint,
                  on_epoch=None if on_epoch is None else lambda epoch: on_epoch(model, epoch),
                  epoch_lines=on_epoch is None)  # callers with on_epoch log their own lines
    return model, seconds


def teacher_metadata(name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig, cost: Cost,
                     val_acc: float, test_acc: float, seconds: float, command: str) -> dict[str, str]:
    """What a teacher file says about itself: everything that made it, and what it scored."""
    return {"format": FORMAT, "arch": name, "spec": str(teacher_spec(name)), "dataset": dataset.name,
            "data_fingerprint": dataset.fingerprint(), "input_shape": json.dumps(list(dataset.input_shape)),
            "num_classes": str(dataset.num_classes), "epochs": str(epochs), "seed": str(seed),
            "train": json.dumps(cfg.__dict__), "macs": str(cost.macs), "params": str(cost.params),
            "val_acc": f"{val_acc:.6f}", "test_acc": f"{test_acc:.6f}", "train_seconds": f"{seconds:.0f}",
            "command": command, "versions": json.dumps(versions())}


def save_teacher(model: Network, path: Path, name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig,
                 cost: Cost, seconds: float, command: str) -> tuple[float, float]:
    """Write a freshly trained teacher with its metadata; returns its (val, test) accuracy. The
    test figure is recorded for people to read; nothing in nas_kd chooses by it."""
    val_acc, test_acc = evaluate(model, dataset.val, dataset), evaluate(model, dataset.test, dataset)
    save_model(model, path, teacher_metadata(name, dataset, epochs, seed, cfg, cost, val_acc, test_acc, seconds,
                                             command))
    return val_acc, test_acc


@dataclass(frozen=True)
class TeacherFile:
    """A trained teacher on disk, known by its metadata alone."""

    path: Path
    meta: dict[str, str]
    shipped: bool

    @property
    def arch(self) -> str:
        return self.meta.get("arch", "?")

    @property
    def val_acc(self) -> float | None:
        return float(self.meta["val_acc"]) if "val_acc" in self.meta else None


def teacher_files(folder: Path, shipped: bool) -> list[TeacherFile]:
    """Every readable teacher file in `folder`, sorted by path; unreadable ones are skipped (the
    loaders name them when they are asked for)."""
    out = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            meta = read_metadata(path)
        except InputError:
            continue
        if meta.get("format") == FORMAT:
            out.append(TeacherFile(path, meta, shipped))
    return out


def shipped_teacher(name: str, dataset: Dataset, folder: Path | None = None) -> TeacherFile | None:
    """The shipped weights of teacher `name` for this dataset, if the package has them. A shipped
    file for this dataset name whose data fingerprint differs from the data loaded is refused: it
    was made on other images, and nas_kd never trains over a shipped teacher."""
    folder = SHIPPED_TEACHERS if folder is None else folder
    fingerprint = None
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        meta = read_metadata(path)  # a damaged shipped file is an error, not a skip
        if meta.get("format") != FORMAT:
            raise InputError(f"shipped teacher file {path} is not a nas_kd teacher (format {meta.get('format')!r}); "
                             "reinstall nas_kd")
        if meta.get("arch") != name or meta.get("dataset") != dataset.name:
            continue
        fingerprint = fingerprint or dataset.fingerprint()
        if meta.get("data_fingerprint") != fingerprint:
            raise InputError(f"shipped teacher {name} ({path}) was trained on {dataset.name} with data fingerprint "
                             f"{meta.get('data_fingerprint')}, but the data loaded has {fingerprint}; run the "
                             "search with --no-shipped-teachers to use cached or newly trained teachers instead")
        return TeacherFile(path, meta, shipped=True)
    return None


def cached_teachers(name: str, dataset: Dataset, cache_dir: Path) -> list[TeacherFile]:
    """Cached teachers of architecture `name` trained on exactly this data (any schedule)."""
    files = [f for f in teacher_files(cache_dir / "teachers", shipped=False) if f.arch == name]
    fingerprint = dataset.fingerprint() if files else None
    return [f for f in files if f.meta.get("data_fingerprint") == fingerprint]


def load_teacher_file(file: TeacherFile, model: nn.Module) -> None:
    """Load `file` into `model`, checking its weights against the digest it recorded."""
    what = f"{'shipped ' if file.shipped else ''}teacher {file.arch}"
    state = load_state(file.path)
    recorded = file.meta.get("weights_sha256")
    if recorded is not None and weights_digest(state) != recorded:
        hint = "reinstall nas_kd" if file.shipped else "delete it to train the teacher anew"
        raise InputError(f"{what} {file.path} is damaged: its weights do not match the digest it recorded; {hint}")
    load_weights(model, file.path, what, state)


def load_or_train(name: str, dataset: Dataset, epochs: int, seed: int, cfg: TrainConfig, cache_dir: Path,
                  device: torch.device, checkpoint: Path | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, shipped: bool = True, min_gain: float = SearchConfig.teacher_min_gain) -> Teacher:
    """The user's checkpoint if given; else the most accurate (by recorded validation accuracy) of
    the shipped teacher for this data and the cached teachers of this architecture and data (the
    shipped one on a tie; cache files from before validation accuracy was recorded rank last);
    else a teacher trained now for `epochs` and cached.

    A cache file that cannot be loaded (truncated, damaged) is moved aside into
    `cache_dir/teachers/broken/` with a warning, and the next candidate is taken, or the teacher
    retrained: a broken cache heals. The user's checkpoint and shipped weights are never trained
    over: those are refused. Training holds a lock on the cache entry, so processes sharing a
    cache directory (search workers) train each teacher once; the others wait and load it. A
    teacher whose training diverges, or whose validation accuracy stays near chance
    (`near_chance` with `min_gain`), ends the run with one line."""
    cost = teacher_cost(name, dataset.input_shape, dataset.num_classes)
    model = build(teacher_spec(name), dataset.input_shape, dataset.num_classes)
    if checkpoint is not None:
        load_weights(model, checkpoint, f"teacher {name} ({dataset.num_classes} classes, input {dataset.input_shape})")
        source, path = str(checkpoint), checkpoint
    elif (found := _load_best(name, dataset, cache_dir, shipped, model, log)) is not None:
        source, path = found
    else:
        path = cache_file(name, dataset, epochs, seed, cfg, cache_dir)
        with cache_lock(path, lambda: log(f"teacher {name} is being trained by another process; waiting for it "
                                          f"({path.with_suffix('.lock')})")):
            found = _load_best(name, dataset, cache_dir, shipped, model, log)  # trained while this one waited
            if found is not None:
                source, path = found
            else:
                log(f"training teacher {name} ({cost.macs / 1e6:.1f}M MACs) for {epochs} epochs; cached at {path}")
                try:
                    model, seconds = train_teacher(name, dataset, epochs, seed, cfg, device, progress)
                except FloatingPointError as e:
                    raise InputError(f"teacher {name} diverged while training ({e}); lower --lr (it was "
                                     f"{cfg.lr:g}) or pass your own weights with --teacher-ckpt {name}=PATH") from None
                source = "trained"
                save_teacher(model, path, name, dataset, epochs, seed, cfg, cost, seconds,
                             f"python -m nas_kd.search (teacher {name}, --teacher-epochs {epochs}, seed {seed})")
    model = model.to(device).eval()
    val_logits = predict(model, dataset.val, dataset)
    teacher = Teacher(name, model, cost, accuracy(val_logits, dataset.val.y), source, val_logits, str(path),
                      weights_digest(model.state_dict()))
    if near_chance(teacher.val_acc, dataset.num_classes, min_gain):
        what = {"trained": f"trained for {epochs} epochs", "shipped": "shipped", "cache": "cached"}.get(
            source, "from your checkpoint")
        raise InputError(f"teacher {name} ({what}: {path}) reaches only {teacher.val_acc:.1%} validation accuracy, "
                         f"near chance ({1 / dataset.num_classes:.1%} for {dataset.num_classes} classes): distilling "
                         "it would teach noise; train it longer (--teacher-epochs, --min-steps), check the dataset's "
                         "labels, or lower --lr (--teacher-min-gain 0 accepts it)")
    return teacher


def near_chance(val_acc: float, num_classes: int, min_gain: float) -> bool:
    """Whether `val_acc` closes less than `min_gain` of the gap between chance (1/K) and 1: with
    the default 0.1, below 19% for 10 classes, 55% for 2; 0 accepts any."""
    chance = 1 / num_classes
    return min_gain > 0 and val_acc < chance + min_gain * (1 - chance)


def _load_best(name: str, dataset: Dataset, cache_dir: Path, shipped: bool, model: nn.Module,
               log: Callable[[str], None]) -> tuple[str, Path] | None:
    """Load the best shipped or cached teacher file into `model`; returns (source, path), or None
    when there is none. Cache files that fail to load are moved aside (`move_aside`) and skipped."""
    for path in sorted((cache_dir / "teachers").glob(f"{name}-*.safetensors")):
        try:
            read_metadata(path)
        except InputError as e:
            _warn_moved(path, move_aside(path), str(e), log)
    candidates = ([f] if shipped and (f := shipped_teacher(name, dataset)) else [])
    candidates += cached_teachers(name, dataset, cache_dir)
    while candidates:
        best = max(candidates, key=lambda f: (-1.0 if f.val_acc is None else f.val_acc, f.shipped))
        try:
            load_teacher_file(best, model)
        except InputError as e:
            if best.shipped:
                raise
            _warn_moved(best.path, move_aside(best.path), str(e), log)
            candidates.remove(best)
            continue
        return ("shipped" if best.shipped else "cache"), best.path
    return None


def _warn_moved(path: Path, aside: Path, why: str, log: Callable[[str], None]) -> None:
    log(f"warning: cached teacher {path} cannot be loaded ({why}); moved it to {aside} and will use another "
        "or train it again")


@contextmanager
def cache_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """An exclusive lock on `path`'s cache entry (an flock on PATH.lock), held while a teacher is
    trained into it: two processes, on one machine or sharing the cache folder, never train the same
    teacher at once. `on_wait` runs once if another process holds it. The lock file is left in place
    (removing it would race with a waiting process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
