"""What a student costs on a device: ONNX export, latency measured with ONNX Runtime or predicted
from a per-block table timed on the target device, and memory (peak activations and weights).

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

Memory follows MCUNet (Lin et al., NeurIPS 2020): the peak activation memory is the most bytes
alive at any layer, its input plus its output plus every tensor a later layer still needs (a
residual block's input across the block, a main branch's output across its shortcut).
Element-wise operations (BatchNorm folded at export, activations, residual adds, SE gating)
work in place. Weights are stored with BatchNorm folded into its convolution: one bias per
output channel of every convolution and linear layer; int8 weights take a byte each and
their biases 4 (int32), per-channel scales not counted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from nas_kd import time_blocks
from nas_kd.arch import BLOCKS, Spec, StageSpec, build, conv_bn, downsampled
from nas_kd.cli import base_parser, fail, quiet_libraries
from nas_kd.config import SearchConfig
from nas_kd.cost import count
from nas_kd.errors import InputError
from nas_kd.progress import log
from nas_kd.space import SearchSpace, load_space

OPSET = 20  # the torch.export-based exporter's own opset on torch 2.14
EXPORTER = "torch.onnx.export(dynamo=True), torch.export-based"
PRECISIONS = ("fp32", "int8")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INT8_WARN_POINTS = 1.0  # an int8 model that loses more test accuracy than this is flagged in the report
RUNS, WARMUP = 100, 10  # timed runs (>= time_blocks.MIN_RUNS) and untimed runs before them
PASSES = time_blocks.PASSES  # medians of RUNS runs of which the fastest is the latency
CALIBRATION_NETWORKS = 12  # whole networks timed beside a table's layers
CALIBRATION_SEED = 1_000_003  # draws them (not a seed benchmarks or tests use for their specs)
MIN_CALIBRATION = 3  # networks needed to fit a scale and an offset

# ---------------------------------------------------------------- units


_LATENCY = re.compile(r"^\s*(?P<num>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)\s*(?P<unit>us|µs|ms)\s*$")


def parse_latency(text: str, what: str = "--latency-budget") -> float:
    """'2ms', '500us', '0.8 ms' -> milliseconds. A unit is required: us (or µs) or ms."""
    m = _LATENCY.match(str(text))
    value = float(m["num"]) / (1000.0 if m["unit"] in ("us", "µs") else 1.0) if m else math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{what} {text!r} is not a positive time with a unit; use a number with us or ms, "
                         "e.g. 500us or 2ms")
    return value


_BYTES = re.compile(r"^\s*(?P<num>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)\s*(?P<unit>[kKmMgG]i?[bB]?|[bB])?\s*$")


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """'256K' (decimal, 256,000 bytes), '256KiB' (binary, 262,144), '1.5M', '4096' -> bytes."""
    m = _BYTES.match(str(text))
    value = math.nan
    if m:
        unit = (m["unit"] or "").lower().rstrip("b")
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}[unit]
        value = float(m["num"]) * scale
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{what} {text!r} is not a positive number of bytes; use a number with an optional "
                         "K/M/G (decimal) or KiB/MiB/GiB (binary) suffix, e.g. 256K or 320KiB")
    return int(round(value))


def format_bytes(n: float) -> str:
    for suffix, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.4g}B"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown latency precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return precision


def require_runtime() -> None:
    """ONNX, ONNX Runtime and onnxscript (the exporter's) are installed, or one clear error."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"{module} is not installed, and ONNX export and latency need it: "
                             "pip install onnx onnxruntime onnxscript (nas_kd's dependencies), or pass --no-onnx "
                             "and no latency flag") from None


# ---------------------------------------------------------------- ONNX


def to_onnx(model: nn.Module, input_shape: tuple[int, int, int], metadata: dict[str, str] | None = None,
            dynamic_batch: bool = True) -> bytes:
    """`model` (logits out) as a serialized ONNX model with input `input` (B, C, H, W) float32,
    normalised as in training, and output `logits` (B, classes); the batch is dynamic unless told."""
    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2 if dynamic_batch else 1, *input_shape)  # 2: a batch of 1 would be specialised
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=shapes, optimize=True, verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def quantize_int8(model: bytes, calibration: np.ndarray, batch: int = 32) -> bytes:
    """Static post-training quantization with ONNX Runtime: QDQ format, int8 weights per output
    channel (symmetric), uint8 activations whose ranges are the min/max over `calibration`
    (N, C, H, W), normalised training images. The metadata is kept."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i:i + batch].astype(np.float32)}
                                 for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("root").setLevel(logging.ERROR)
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        out = onnx.load(str(dst))
    original = onnx.load_from_string(model)
    if not out.metadata_props:
        out.metadata_props.extend(original.metadata_props)
    return out.SerializeToString()


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


def latency_meter(cfg: SearchConfig, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                  calibration: np.ndarray | None = None) -> tuple[Callable[[Spec], float] | None, str]:
    """How a search gets a spec's latency: predicted from `cfg.latency_table`, measured here, or
    not at all (`cfg.onnx` off and no latency setting); and a line that says which."""
    check_precision(cfg.latency_precision)
    if cfg.latency_table:
        table = LatencyTable.load(cfg.latency_table, space, input_shape, num_classes, cfg.latency_precision)
        where = table.device.get("cpu") or table.device.get("machine") or "unknown device"
        return table.predict, (f"latency ({cfg.latency_precision}) predicted from {cfg.latency_table} ({where}; "
                               f"{table.calibration_line()})")
    if not (cfg.onnx or cfg.latency_budget_ms is not None or cfg.pareto_cost == "latency_ms"):
        return None, "latency not measured (--no-onnx)"
    require_runtime()

    @functools.cache  # a spec proposed again is not exported and timed again
    def measure(spec: Spec) -> float:
        return measure_latency(spec, input_shape, num_classes, cfg.latency_precision, cfg.latency_threads, calibration)

    return measure, (f"latency ({cfg.latency_precision}) measured here with ONNX Runtime, batch 1, "
                     f"{cfg.latency_threads} thread(s), fastest of {PASSES} medians of {RUNS} runs")


# ---------------------------------------------------------------- layers and tables


class Classifier(nn.Module):
    """A network's end without its head conv: global average pooling and the linear layer."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class Layer:
    """One entry of a latency table: a stem, a block, a head conv or the classifier, with the
    shape it reads (cin, h, w) and its output channels."""

    kind: str  # "stem", "block", "head" or "classifier"
    cin: int
    cout: int
    h: int
    w: int
    stage: StageSpec | None = None  # for a block: its type, stride, kernel, expansion, SE, internal width

    def key(self) -> str:
        what = self.kind if self.stage is None else (
            f"{self.stage.block}_s{self.stage.stride}_k{self.stage.kernel}_e{self.stage.expand}"
            + (f"_m{self.stage.mid}" if self.stage.mid else "") + ("_se" if self.stage.se else ""))
        return f"{what}:{self.cin}>{self.cout}@{self.h}x{self.w}"

    def module(self) -> nn.Module:
        """The layer alone, built as `arch.Network` builds it."""
        if self.kind == "stem":
            return nn.Sequential(conv_bn(self.cin, self.cout, 3), nn.ReLU(inplace=True))
        if self.kind == "head":
            return nn.Sequential(conv_bn(self.cin, self.cout, 1), nn.ReLU(inplace=True))
        if self.kind == "classifier":
            return Classifier(self.cin, self.cout)
        st = self.stage
        return BLOCKS[st.block](self.cin, self.cout, st.stride, st.kernel, st.expand, st.se, st.mid)


def stage_layers(stage: StageSpec, cin: int, h: int, w: int) -> tuple[list[Layer], int, int]:
    """The blocks of `stage` entered with (cin, h, w): the first, then depth-1 repeats of the
    stride-1 block; and the (h, w) it leaves."""
    ho, wo = downsampled(stage.block, stage.stride, h), downsampled(stage.block, stage.stride, w)
    first = Layer("block", cin, stage.width, h, w, dataclasses.replace(stage, depth=1))
    rest = Layer("block", stage.width, stage.width, ho, wo, dataclasses.replace(stage, depth=1, stride=1))
    return [first] + [rest] * (stage.depth - 1), ho, wo


def spec_layers(spec: Spec, input_shape: tuple[int, int, int], num_classes: int) -> list[Layer]:
    """Every layer of `spec` in order (a repeated block as often as it runs)."""
    c, h, w = input_shape
    layers = [Layer("stem", c, spec.stem, h, w)]
    cin = spec.stem
    for stage in spec.stages:
        blocks, h, w = stage_layers(stage, cin, h, w)
        layers += blocks
        cin = stage.width
    if spec.head:
        layers.append(Layer("head", cin, spec.head, h, w))
        cin = spec.head
    return layers + [Layer("classifier", cin, num_classes, h, w)]


def space_layers(space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int) -> list[Layer]:
    """Every distinct layer any spec of `space` can hold, at every input shape it can meet."""
    c, h, w = input_shape
    found: dict[str, Layer] = {}

    def add(layer: Layer) -> None:
        found.setdefault(layer.key(), layer)

    for stem in space.stem:
        add(Layer("stem", c, stem, h, w))
    widths = set(space.stem)
    for st in space.stages:
        ho = wo = None
        for block in st.block:
            for expand in (st.expand if BLOCKS[block].uses_expand else (1,)):
                for width in st.width:
                    for kernel in st.kernel:
                        for se in st.se:
                            stage = StageSpec(block, max(st.depth), width, st.stride, kernel, expand, se)
                            for cin in sorted(widths):
                                layers, ho, wo = stage_layers(stage, cin, h, w)
                                for layer in layers[:2]:  # the first block, and the repeated one if any
                                    add(layer)
        widths, h, w = set(st.width), ho, wo
    for head in space.head:
        if head:
            for cin in sorted(widths):
                add(Layer("head", cin, head, h, w))
    for cin in sorted({*(hd for hd in space.head if hd), *(widths if 0 in space.head else ())}):
        add(Layer("classifier", cin, num_classes, h, w))
    return list(found.values())


def noop_model(input_shape: tuple[int, int, int]) -> bytes:
    """An ONNX model that copies its (1, C, H, W) input: its run time is ONNX Runtime's per-call overhead."""
    import onnx
    from onnx import TensorProto, helper

    shape = [1, *input_shape]
    graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "noop",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def calibration_specs(space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                      n: int = CALIBRATION_NETWORKS) -> list[Spec]:
    """`n` distinct specs of `space` spread evenly over its MACs (of 20n seeded random ones, those
    at evenly spaced ranks), so a fit to them spans the space's latencies."""
    drawn = list(dict.fromkeys(space.random_specs(20 * n, seed=CALIBRATION_SEED)))
    if len(drawn) <= n:
        return drawn
    with torch.random.fork_rng(devices=[]):
        macs = {s: count(build(s, input_shape, num_classes, channels_last=False), input_shape).macs for s in drawn}
    ranked = sorted(drawn, key=lambda s: (macs[s], str(s)))
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)] if n > 1 else ranked[-1:]


def export_blocks(space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int, out: Path,
                  precisions: tuple[str, ...] = ("fp32",), progress: Callable[[str], None] = log,
                  networks: int = CALIBRATION_NETWORKS, extra: list[Spec] | tuple[Spec, ...] = ()) -> dict[str, Any]:
    """Write every layer of `space` as its own ONNX model of batch 1 under `out`, and `networks`
    whole calibration networks (`calibration_specs`), with `manifest.json` and a copy of the
    stand-alone timing script; returns the manifest. The layers of the `extra` specs are added, so
    the table also prices students outside the space (the hand-made family, `nas_kd.start.family_specs`)."""
    require_runtime()
    out.mkdir(parents=True, exist_ok=True)
    layers = list({layer.key(): layer for layer in space_layers(space, input_shape, num_classes)
                   + [layer for spec in extra for layer in spec_layers(spec, input_shape, num_classes)]}.values())
    noop = f"noop:{'x'.join(map(str, input_shape))}"
    files: dict[str, dict[str, str]] = {p: {} for p in precisions}
    for precision in precisions:
        (out / precision).mkdir(exist_ok=True)
        (out / precision / "noop.onnx").write_bytes(noop_model(input_shape))
        files[precision][noop] = f"{precision}/noop.onnx"
    rng = np.random.default_rng(0)
    nets: dict[str, dict[str, str]] = {p: {} for p in precisions}

    def write(make: Callable[[], nn.Module], shape: tuple[int, int, int], stem: str, into: dict[str, dict[str, str]],
              key: str) -> None:
        """`make()`'s module, seeded, as `<precision>/<stem>.onnx` for every precision, listed under `key`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = make()
        data = to_onnx(module, shape, dynamic_batch=False)
        for precision in precisions:
            name = f"{precision}/{stem}.onnx"
            blob = data if precision == "fp32" else quantize_int8(
                data, rng.standard_normal((8, *shape)).astype(np.float32), batch=1)
            (out / name).write_bytes(blob)
            into[precision][key] = name

    for i, layer in enumerate(layers):
        write(layer.module, (layer.cin, layer.h, layer.w), f"{i:04d}", files, layer.key())
        if (i + 1) % 25 == 0 or i + 1 == len(layers):
            progress(f"exported {i + 1}/{len(layers)} layers")
    for i, spec in enumerate(calibration_specs(space, input_shape, num_classes, networks) if networks else []):
        write(functools.partial(build, spec, input_shape, num_classes, channels_last=False), input_shape,
              f"network{i:02d}", nets, str(spec))
    if networks:
        progress(f"exported {len(nets[precisions[0]])} calibration networks")
    manifest = {"format": time_blocks.MANIFEST_FORMAT, "space": space.name, "space_fingerprint": space.fingerprint(),
                "input_shape": list(input_shape), "num_classes": num_classes, "noop": noop, "opset": OPSET,
                "exporter": EXPORTER, "files": files, "networks": nets}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.copyfile(Path(time_blocks.__file__), out / "time_blocks.py")
    return manifest


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
        if made != want:
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


# ---------------------------------------------------------------- memory


_CREATES = {"conv2d", "linear", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d",
            "adaptive_avg_pool2d", "cat"}  # everything else that reads activations works in place


class _Liveness(TorchFunctionMode):
    """Records, for every operation on activations, the buffer it reads and the one it creates."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.keep = [x]  # ids stay unique while the tensors live
        self.buffer_of = {id(x): 0}
        self.sizes = [x.numel()]
        self.events: list[tuple[int | None, list[int]]] = []  # (created buffer or None, buffers read)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        read = [self.buffer_of[id(t)] for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and id(t) in self.buffer_of]
        if not read or not isinstance(out, torch.Tensor):
            return out
        self.keep.append(out)
        if getattr(func, "__name__", "") in _CREATES:
            self.buffer_of[id(out)] = len(self.sizes)
            self.sizes.append(out.numel())
            self.events.append((len(self.sizes) - 1, read))
        else:
            self.buffer_of[id(out)] = max(read, key=lambda b: self.sizes[b])
            self.events.append((None, read))
        return out


def peak_activations(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Values alive at once at the peak of one forward pass of one input (MCUNet's definition).
    Counts depend on shapes only, so the pass runs where the model is, in any memory format; in
    eval mode, so no BatchNorm statistic moves (the model is left as it was, and not copied)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(1, *input_shape, device=tensor.device if tensor is not None else "cpu")
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), _Liveness(x) as trace:
            out = model.eval()(x)
    finally:
        for m, training in modes:
            m.training = training
    last = [0] * len(trace.sizes)
    for i, (_, read) in enumerate(trace.events):
        for b in read:
            last[b] = i
    last[trace.buffer_of[id(out)]] = len(trace.events)  # the output is read after the pass
    born = [-1] + [i for i, (b, _) in enumerate(trace.events) if b is not None]
    peak = trace.sizes[0]
    for i, (b, _) in enumerate(trace.events):
        if b is not None:
            peak = max(peak, sum(size for buf, size in enumerate(trace.sizes) if born[buf] < i <= last[buf])
                       + trace.sizes[b])
    return peak


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights, biases) of `model` with BatchNorm folded: every convolution and linear layer
    has a bias per output channel."""
    weights = biases = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weights += m.weight.numel()
            biases += m.weight.shape[0]
    return weights, biases


def memory_facts(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Bytes of peak activations and of weights, fp32 and int8."""
    peak = peak_activations(model, input_shape)
    weights, biases = weight_counts(model)
    return {"peak_memory_fp32": 4 * peak, "peak_memory_int8": peak,
            "weights_fp32": 4 * (weights + biases), "weights_int8": weights + 4 * biases}


# ---------------------------------------------------------------- command line


def parse_input(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(text))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise InputError(f"--input {text!r} is not CxHxW; use three positive integers, e.g. 1x28x28 or 3x32x32")
    return int(m[1]), int(m[2]), int(m[3])


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m nas_kd.latency", "Latency tables for a target device, and latency and memory "
                         "of one spec on this machine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
    b = sub.add_parser("blocks", help="export every layer of a search space as ONNX models, for time_blocks.py")
    b.add_argument("--search-space", default="resnet", help="a shipped space (resnet, mobilenetv2) or a YAML path")
    b.add_argument("--input", required=True, help="input shape CxHxW, e.g. 1x28x28 (Fashion-MNIST) or 3x32x32")
    b.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    b.add_argument("--precision", default="fp32", choices=[*PRECISIONS, "both"], help="fp32 (default), int8 or both")
    b.add_argument("--out", type=Path, required=True, help="folder to write (then copy it to the device)")
    b.add_argument("--networks", type=int, default=CALIBRATION_NETWORKS,
                   help=f"whole networks timed beside the layers, to calibrate the layer sums (default "
                        f"{CALIBRATION_NETWORKS}; 0: none, predictions uncalibrated)")
    m = sub.add_parser("measure", help="latency and memory of one spec on this machine")
    m.add_argument("--spec", required=True, help="a spec string, e.g. 'c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1'")
    m.add_argument("--input", required=True, help="input shape CxHxW, e.g. 1x28x28")
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--precision", default="fp32", choices=PRECISIONS)
    m.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    m.add_argument("--latency-table", help="predict from this table instead of measuring")
    m.add_argument("--search-space", default="resnet", help="with --latency-table: the space it was made for")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        shape = parse_input(args.input)
        if args.classes < 2:
            raise InputError(f"--classes must be >= 2, got {args.classes}")
        if args.command == "blocks":
            if args.networks != 0 and args.networks < MIN_CALIBRATION:
                raise InputError(f"--networks must be 0 or at least {MIN_CALIBRATION} (a scale and an offset are "
                                 f"fitted to them), got {args.networks}")
            space = load_space(args.search_space)
            precisions = PRECISIONS if args.precision == "both" else (args.precision,)
            layers = space_layers(space, shape, args.classes)
            log(f"exporting {len(layers)} layers and {args.networks} calibration networks of space {space.name} at "
                f"input {args.input} ({', '.join(precisions)})")
            export_blocks(space, shape, args.classes, args.out, precisions, networks=args.networks)
            print(f"wrote {args.out}: copy it to the device and run there\n"
                  f"  python3 {args.out / 'time_blocks.py'} {args.out} --out table.json --threads 1\n"
                  f"(needs only Python, numpy and onnxruntime); then search with --latency-table table.json")
            return 0
        spec = Spec.parse(args.spec)
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        model = build(spec, shape, args.classes, channels_last=False)
        facts: dict[str, Any] = {"spec": str(spec), **memory_facts(model, shape)}
        if args.latency_table:
            table = LatencyTable.load(args.latency_table, load_space(args.search_space), shape, args.classes,
                                      args.precision)
            facts.update(latency_ms=round(table.predict(spec), 4), latency_source=f"table {args.latency_table}")
        else:
            require_runtime()
            facts.update(latency_ms=round(measure_latency(spec, shape, args.classes, args.precision, args.threads), 4),
                         latency_source=f"measured here, {args.threads} thread(s)")
        facts["precision"] = args.precision
    except InputError as e:
        return fail(str(e))
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
