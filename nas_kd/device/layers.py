"""The layers of a latency table: every layer a search space can produce, at every input shape it
can meet (Once-for-All / FBNet style), exported one ONNX model each for `time_blocks.py` to time
on the target device, with a dozen whole calibration networks of the space beside them."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.core.progress import log
from nas_kd.device import time_blocks
from nas_kd.device.convert import EXPORTER, INPUT_NAME, OPSET, OUTPUT_NAME, quantize_int8, require_runtime, to_onnx
from nas_kd.nets.arch import BLOCKS, Spec, StageSpec, build, conv_bn, downsampled
from nas_kd.nets.cost import count
from nas_kd.nets.space import SearchSpace

CALIBRATION_NETWORKS = 12  # whole networks timed beside a table's layers
CALIBRATION_SEED = 1_000_003  # draws them (not a seed benchmarks or tests use for their specs)



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
    the table also prices students outside the space (the hand-made family, `nas_kd.nas.start.family_specs`)."""
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


