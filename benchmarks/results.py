"""Results files and the machine: small JSON files in benchmarks/results/ that the benchmarks fill one
entry at a time, so a killed run resumes where it stopped and a re-run with new scores costs no
retraining. Entries are keyed by what determines them (a spec and a digest of the settings); each
write replaces the file atomically. They are committed with the benchmarks."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from nas_kd.core.config import SearchConfig

RESULTS = Path(__file__).parent / "results"


def settings_id(settings: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the settings' sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def search_settings_id(base: SearchConfig, device: str) -> str:
    """The results' key of picks made and retrained with the search's defaults `base`: its fields
    but the seed, the cache folder and the time budget's; the device where it is not the CPU (the
    first CPU runs saw the default device, and keep their key)."""
    kept = {k: v for k, v in dataclasses.replace(base, device=SearchConfig.device).to_dict().items()
            if k not in ("seed", "cache_dir", "time_budget", "time_fixed", "final_augment", "search_share",
                         "int8_target", "budget_edge", "edge_min_width", "edge_depth")}
    return settings_id({"config": json.dumps(kept, sort_keys=True), "v": 1, **({"device": device} if device != "cpu" else {})})


def machine(device: torch.device | None = None) -> str:
    """The processor, its cores and torch's threads, and the GPU where `device` is one."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}{gpu}")


class ResultsFile:
    """`{section: {key: entry}}` in one JSON file, which several processes may fill at once (say,
    the references and the scores of one benchmark): every write re-reads the file under a lock
    and adds its entry to what is there."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, section: str, key: str) -> Any:
        return self.data.get(section, {}).get(key)

    def refresh(self) -> None:
        """Read what other processes wrote since."""
        self.data = self._read()

    def put(self, section: str, key: str, entry: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()
            self.data.setdefault(section, {})[key] = entry
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)
