"""The ensemble's targets kept on disk across runs: a second search on the same data and teachers (at
another budget, say) reads what the first computed instead of running the teachers again.

A stored entry is keyed by everything its numbers depend on: the data's fingerprint and normalisation,
the teachers (names and weights digests, in order), the images it covers, their views, the seed of the
views' augmentation, and the feature maps it holds. It is one safetensors file in
CACHE/targets/<key>.safetensors, written atomically; one that cannot be read or does not fit what it
should hold is moved into broken/ beside it with one warning line, and computed again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import Dataset
from nas_kd.nets.weights import move_aside, usual_mode
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, FeatureSet

FORMAT = "nas_kd.targets.1"


def targets_key(ensemble: Ensemble, dataset: Dataset, batches: BatchIterator, features: FeatureSet) -> str:
    blob = json.dumps({
        "format": FORMAT, "data": dataset.fingerprint(), "mean": dataset.mean, "std": dataset.std,
        "teachers": [[t.name, t.digest] for t in ensemble.members],
        "indices": hashlib.sha256(batches.indices.cpu().numpy().tobytes()).hexdigest(),
        "split": len(batches.split), "views": batches.views, "seed": batches.seed,
        "augment": repr(batches.augment), "features": features}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stored_targets(ensemble: Ensemble, dataset: Dataset, batches: BatchIterator, features: FeatureSet,
                   folder: Path | None, log: Callable[[str], None], progress: bool = True,
                   limit_gb: float = 2.0) -> tuple[CachedTargets, str]:
    """The ensemble's targets over `batches`: read from `folder` when an earlier run stored them,
    else computed (`CachedTargets`) and stored there (when they take at most `limit_gb`). Returns them
    and "stored", "computed and stored" or "computed". Without `folder` (or a teacher without a
    digest, whose weights cannot be told apart) nothing is read or written."""
    if folder is None or any(t.digest is None for t in ensemble.members):
        return CachedTargets(ensemble, batches, features, progress=progress), "computed"
    path = folder / f"{targets_key(ensemble, dataset, batches, features)}.safetensors"
    if path.is_file():
        try:
            return _read(path, ensemble, batches, features), "stored"
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            aside = move_aside(path)
            log(f"warning: stored ensemble targets {path} cannot be used ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                f"moved them to {aside} and computing them again")
    targets = CachedTargets(ensemble, batches, features, progress=progress)
    if targets.nbytes() > limit_gb * 1e9:
        return targets, "computed"
    _write(path, targets)
    return targets, "computed and stored"


def _write(path: Path, targets: CachedTargets) -> None:
    tensors = {"logits": targets.logits.detach().cpu().contiguous()}
    for m, member in enumerate(targets.features or []):
        for s, f in enumerate(member):
            tensors[f"features.{m}.{s}"] = f.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # workers sharing the folder write their own
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.chmod(usual_mode())
    tmp.replace(path)


def _read(path: Path, ensemble: Ensemble, batches: BatchIterator, features: FeatureSet) -> CachedTargets:
    tensors = load_file(str(path))
    logits = tensors["logits"]
    expected = (batches.views, len(ensemble.members), len(batches.indices))
    if tuple(logits.shape[:3]) != expected or not torch.isfinite(logits).all():
        raise ValueError(f"logits of shape {tuple(logits.shape)}, expected {expected} x classes, all finite")
    device = batches.indices.device
    feats = None
    if features:
        members = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("features.")})
        if members != list(range(len(ensemble.feature_members))):
            raise ValueError(f"feature maps of {len(members)} members, expected {len(ensemble.feature_members)}")
        feats = [[tensors[f"features.{m}.{s}"].to(device) for s in range(sum(k.startswith(f"features.{m}.")
                                                                            for k in tensors))] for m in members]
    return CachedTargets.of(ensemble, batches, features, logits.to(device), feats)
