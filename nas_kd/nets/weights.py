"""Weights on disk: safetensors files that describe themselves (string metadata and a digest of
their tensors, written atomically), state dicts read from safetensors or torch files without
unpickling code, loaded into a network with one line per mismatch, and broken files moved aside."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nas_kd.core.errors import InputError


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes: a damaged file no longer matches."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors too (num_batches_tracked)
    return h.hexdigest()


def save_model(model: nn.Module, path: Path, metadata: dict[str, str], dtype: torch.dtype | None = None) -> None:
    """safetensors weights (and BN buffers) with string metadata and their digest; written
    atomically. `dtype` stores floating tensors in that type (float16 for shipped teachers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp), metadata={**metadata, "weights_sha256": weights_digest(state)})
    tmp.chmod(usual_mode())  # safetensors writes 0600; the files beside it follow the user's umask
    tmp.replace(path)


def usual_mode() -> int:
    """The mode a file created now gets from the user's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only, not the weights)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: not a readable safetensors file "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (loaded with weights_only=True)."""
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise InputError(f"cannot read checkpoint {path}: expected safetensors or a torch state dict "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {path} holds no state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_weights(model: nn.Module, path: Path, what: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load `path` (or its already-read `state`) into `model`; a key or shape mismatch is one line."""
    state = load_state(path) if state is None else state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected
                  else f"{wrong[0]!r} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise InputError(f"checkpoint {path} does not fit {what}: {detail} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys)")
    model.load_state_dict(state)


def move_aside(path: Path) -> Path:
    """Move a broken cache file into `broken/` beside it (never overwriting); returns where it went."""
    folder = path.parent / "broken"
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.stem}.{n}{path.suffix}", n + 1
    path.replace(target)
    return target
