"""A student's latency on a device: measured with ONNX Runtime here, or predicted from a per-block
table timed on the target device. ONNX conversion is `nas_kd.device.convert`'s, memory `nas_kd.device.memory`'s,
the command line `nas_kd.latency`'s.

    python -m nas_kd.latency blocks --search-space resnet --input 1x28x28 --out blocks/
    python3 blocks/time_blocks.py blocks/ --out table.json          # on the target device
    python -m nas_kd.search --flops-budget 50M --latency-budget 2ms --latency-table table.json
    python -m nas_kd.latency measure --spec 'c16|basic_d1_w16_s1_k3_e1|...' --input 1x28x28

Latency is one image (batch 1) through the ONNX model with ONNX Runtime's CPU provider, after
warm-up, the fastest of 3 medians of at least 50 runs each (`time_blocks.latency_ms`, the same code
on both machines).
Weights do not change it, so a spec is timed with freshly initialised weights.

A table holds the latency of every layer the search space can produce, each at every input shape
the space can feed it (Once-for-All / FBNet style): the stem, every block (type, widths, stride,
kernel, expansion, SE) and the head with the classifier. A spec's layer sum is the sum of its
layers' latencies minus the per-call overhead of all but one of them (each layer was timed as its
own model; the overhead is the time of a no-op model of the network's input shape). A table also
holds a dozen whole networks of the space timed beside the layers (`CALIBRATION_NETWORKS`, spread
over the space's MACs); the prediction is the layer sum times a scale plus an offset, fitted to
those networks by least squares on relative error. The fit absorbs what separate timing gets
wrong on that device (each layer model's own output allocation, caches cold between models,
runtime fusions across layer boundaries).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.device import time_blocks
from nas_kd.device.convert import quantize_int8, require_runtime, to_onnx
from nas_kd.device.layers import spec_layers
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.space import SearchSpace

PRECISIONS = ("fp32", "int8")
RUNS, WARMUP = 100, 10  # timed runs (>= time_blocks.MIN_RUNS) and untimed runs before them
PASSES = time_blocks.PASSES  # medians of RUNS runs of which the fastest is the latency
MIN_CALIBRATION = 3  # networks needed to fit a scale and an offset

# ---------------------------------------------------------------- units


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown latency precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return precision


# ---------------------------------------------------------------- measured here


def measure_latency(spec: Spec, input_shape: tuple[int, int, int], num_classes: int, precision: str = "fp32",
                    threads: int = 1, calibration: np.ndarray | None = None, runs: int = RUNS,
                    warmup: int = WARMUP, passes: int = PASSES) -> float:
    """Milliseconds for one image through `spec` with ONNX Runtime on this machine: the fastest
    of `passes` medians of `runs` runs (`time_blocks.latency_ms`).

    int8 models are quantised with `calibration` images (random ones when None: the ranges do not
    change the time)."""
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
        torch.manual_seed(0)
        model = build(spec, input_shape, num_classes, channels_last=False)
    data = to_onnx(model, input_shape)
    if precision == "int8":
        if calibration is None:
            calibration = np.random.default_rng(0).standard_normal((32, *input_shape)).astype(np.float32)
        data = quantize_int8(data, calibration)
    return time_blocks.latency_ms(time_blocks.make_session(data, threads), warmup, runs, passes)


@dataclass(frozen=True)
class LatencySettings:
    """How a run times its students: the model's precision, ONNX Runtime's threads, the table that
    predicts latencies instead (None: none), and whether to measure here at all when there is none."""

    precision: str = "fp32"
    threads: int = 1
    table: str | None = None
    measure: bool = True

    @classmethod
    def of(cls, cfg: SearchConfig) -> LatencySettings:
        """A run's: measured when it exports ONNX, has a latency bound or minimises latency."""
        return cls(cfg.latency_precision, cfg.latency_threads, cfg.latency_table,
                   cfg.onnx or cfg.latency_budget_ms is not None or cfg.pareto_cost == "latency_ms")


def latency_meter(settings: LatencySettings, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                  calibration: np.ndarray | None = None) -> tuple[Callable[[Spec], float] | None, str]:
    """How a search gets a spec's latency: predicted from `settings.table`, measured here, or not at
    all (`settings.measure` off and no table); and a line that says which."""
    precision, threads = settings.precision, settings.threads
    check_precision(precision)
    if settings.table:
        table = LatencyTable.load(settings.table, space, input_shape, num_classes, precision)
        where = table.device.get("cpu") or table.device.get("machine") or "unknown device"
        return table.predict, (f"latency ({precision}) predicted from {settings.table} ({where}; "
                               f"{table.calibration_line()})")
    if not settings.measure:
        return None, "latency not measured (--no-onnx)"
    require_runtime()

    @functools.cache  # a spec proposed again is not exported and timed again
    def measure(spec: Spec) -> float:
        return measure_latency(spec, input_shape, num_classes, precision, threads, calibration)

    return measure, (f"latency ({precision}) measured here with ONNX Runtime, batch 1, "
                     f"{threads} thread(s), fastest of {PASSES} medians of {RUNS} runs")


@dataclass(frozen=True)
class LatencyTable:
    """A latency table read back from `time_blocks.py`'s JSON, for one precision."""

    path: str
    space: str
    input_shape: tuple[int, int, int]
    num_classes: int
    precision: str
    entries: dict[str, float]  # layer key -> ms
    overhead: float  # ms of one call of a no-op model
    device: dict[str, Any]
    networks: dict[str, float] = dataclasses.field(default_factory=dict)  # calibration spec -> measured ms
    scale: float = 1.0  # prediction = scale * layer sum + offset, fitted to `networks`
    offset: float = 0.0

    @classmethod
    def load(cls, path: str | Path, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
             precision: str) -> LatencyTable:
        """The table at `path`, refused in one line unless it was made for exactly this space,
        input shape, class count and precision."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise InputError(f"cannot read latency table {path}: {e.strerror}") from None
        except ValueError:
            raise InputError(f"latency table {path} is not JSON; expected the table written by time_blocks.py") from None
        return cls.from_data(data, str(path), space, input_shape, num_classes, precision)

    @classmethod
    def from_data(cls, data: Any, path: str, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                  precision: str) -> LatencyTable:
        """`load` of a table already read (`time_blocks.time_folder`'s dict); `path` names it in messages."""
        if not isinstance(data, dict) or data.get("format") != time_blocks.TABLE_FORMAT:
            raise InputError(f"{path} is not a nas_kd latency table (expected format {time_blocks.TABLE_FORMAT!r}, "
                             "written by time_blocks.py)")
        made = (data.get("space"), data.get("space_fingerprint"), tuple(data.get("input_shape") or ()),
                data.get("num_classes"))
        want = (space.name, space.fingerprint(), tuple(input_shape), num_classes)
        if made[1:] != want[1:]:  # the space's choices, not its name (resnet-v1 was named resnet)
            raise InputError(f"latency table {path} was made for space {made[0]!r} (fingerprint {made[1]}), input "
                             f"{'x'.join(map(str, made[2]))}, {made[3]} classes; this search has space {want[0]!r} "
                             f"(fingerprint {want[1]}), input {'x'.join(map(str, want[2]))}, {want[3]} classes: "
                             "make a table for it with python -m nas_kd.latency blocks")
        entries = data.get("entries", {}).get(precision)
        if not entries or data.get("noop") not in entries:
            raise InputError(f"latency table {path} has no {precision} timings (it has "
                             f"{', '.join(data.get('entries', {})) or 'none'}); run python -m nas_kd.latency blocks "
                             f"--precision {precision} and time them")
        try:
            networks = {str(Spec.parse(k)): float(v) for k, v in (data.get("networks") or {}).get(precision, {}).items()}
            bad = [f"{k}: {v}" for k, v in networks.items() if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"a latency must be a positive number of ms, got {bad[0]}")
        except (InputError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"latency table {path} has unreadable calibration networks ({e}); time the folder "
                             "again with its time_blocks.py") from None
        table = cls(str(path), space.name, tuple(input_shape), num_classes, precision,
                    {k: float(v) for k, v in entries.items()}, float(entries[data["noop"]]), data.get("device", {}),
                    networks)
        return table.calibrated()

    def layer_sum(self, spec: Spec) -> float:
        """The sum of `spec`'s layer timings, less the per-call overhead of all but one, in ms."""
        layers = spec_layers(spec, self.input_shape, self.num_classes)
        missing = [layer.key() for layer in layers if layer.key() not in self.entries]
        if missing:
            raise InputError(f"latency table {self.path} has no entry for {missing[0]} (spec {spec}); "
                             "it was made for another space")
        return sum(self.entries[layer.key()] - self.overhead for layer in layers) + self.overhead

    def calibrated(self) -> LatencyTable:
        """This table with the scale and offset that map layer sums onto its networks' measured
        latencies, least squares on relative error; as it is with fewer than `MIN_CALIBRATION`
        networks or a fit that does not scale up (tables of before calibration, a degenerate set)."""
        if len(self.networks) < MIN_CALIBRATION:
            return self
        sums = np.array([self.layer_sum(Spec.parse(k)) for k in self.networks])
        measured = np.array(list(self.networks.values()))
        weight = 1 / measured
        (scale, offset), _, rank, _ = np.linalg.lstsq(np.stack([sums, np.ones_like(sums)], 1) * weight[:, None],
                                                      measured * weight, rcond=None)
        if rank < 2 or not (math.isfinite(scale) and math.isfinite(offset) and scale > 0):
            return self  # networks of one layer sum fix no scale; a shrinking fit explains nothing
        return dataclasses.replace(self, scale=float(scale), offset=float(offset))

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrated` fitted a scale and offset (else predictions are the layer sums)."""
        return (self.scale, self.offset) != (1.0, 0.0)

    def predict(self, spec: Spec) -> float:
        """Milliseconds for one image through `spec` on the table's device."""
        return max(0.0, self.scale * self.layer_sum(spec) + self.offset)

    def calibration_line(self) -> str:
        """How the table's predictions are calibrated, and how well they fit its networks."""
        if not self.is_calibrated:
            if len(self.networks) < MIN_CALIBRATION:
                return (f"layer sums uncalibrated: {len(self.networks)} calibration networks, need {MIN_CALIBRATION}; "
                        "time a folder from this version's python -m nas_kd.latency blocks")
            return (f"layer sums uncalibrated: no scale fits the {len(self.networks)} calibration networks (their layer "
                    "sums are all equal, or the fit shrinks them to nothing)")
        errors = [self.predict(Spec.parse(k)) / ms - 1 for k, ms in self.networks.items()]
        within = sum(abs(e) <= 0.10 for e in errors)
        return (f"layer sums x{self.scale:.3f} {self.offset:+.4f} ms, fitted to {len(errors)} networks, "
                f"{within} of them within +-10%, largest error {max(errors, key=abs):+.1%}")
