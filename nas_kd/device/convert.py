"""ONNX conversion and int8 quantisation of a student, as both the export and the latency
measurements need them.

A model becomes ONNX through the torch.export-based exporter (`torch.onnx.export(dynamo=True)`,
which needs onnxscript), opset `OPSET`, input `input` (B, C, H, W) float32 normalised as in
training and output `logits` (B, classes). int8 is ONNX Runtime's static post-training
quantisation (QDQ, weights per output channel, activations calibrated by min/max), with the
types and weight range `nas_kd.device.int8` chooses per target CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nas_kd.core.errors import InputError
from nas_kd.device.time_blocks import make_session

OPSET = 20  # the torch.export-based exporter's own opset on torch 2.14
EXPORTER = "torch.onnx.export(dynamo=True), torch.export-based"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def require_runtime() -> None:
    """ONNX, ONNX Runtime and onnxscript (the exporter's) are installed, or one clear error."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"{module} is not installed, and ONNX export and latency need it: "
                             "pip install onnx onnxruntime onnxscript (nas_kd's dependencies), or pass --no-onnx "
                             "and no latency flag") from None


_TABLES: dict[object, object] = {}  # the builder's arguments (the opset) -> its table, built once per process


@contextlib.contextmanager
def reused_torchlib_table() -> Iterator[bool]:
    """For the `with` block, the exporter builds its table of ONNX translations once per process
    and opset, and each export gets a copy of it; yields whether it does.

    `torch.onnx.export(dynamo=True)` rebuilds the table from onnxscript's torchlib on every call:
    0.9 s of a 3.1-s student export on the 2-core machine (BENCHMARKS.md, *ONNX export*), paid by
    every candidate a latency-budget search times and by every block of a latency table. The
    table depends on the opset alone; an export given custom translations adds them to its copy,
    never to the kept table, and outside the block torch's own builder is back in place. The
    exported bytes are the same either way (tests/test_latency.py checks). This reaches into
    torch's private API: where it has moved, the block yields False and exports run as before."""
    try:
        from torch.onnx._internal.exporter import _registration
        registry = _registration.ONNXRegistry
        original = registry.__dict__["from_torchlib"]
        build = registry.from_torchlib
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def from_torchlib(*args: object, **kwargs: object) -> object:
        key = (args, tuple(sorted(kwargs.items())))  # the opset, however torch passes it
        if key not in _TABLES:
            _TABLES[key] = build(*args, **kwargs)
        table = _TABLES[key]
        own = object.__new__(type(table))
        own.__dict__.update(table.__dict__, functions={k: list(v) for k, v in table.functions.items()})
        return own

    registry.from_torchlib = staticmethod(from_torchlib)
    try:
        yield True
    finally:
        registry.from_torchlib = original


def to_onnx(model: nn.Module, input_shape: tuple[int, int, int], metadata: dict[str, str] | None = None,
            dynamic_batch: bool = True, reuse_table: bool = True) -> bytes:
    """`model` (logits out) as a serialized ONNX model with input `input` (B, C, H, W) float32,
    normalised as in training, and output `logits` (B, classes); the batch is dynamic unless told.
    `reuse_table`: the exporter's translation table is built once per process (`reused_torchlib_table`)."""
    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2 if dynamic_batch else 1, *input_shape)  # 2: a batch of 1 would be specialised
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    reuse = reused_torchlib_table() if reuse_table else contextlib.nullcontext()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), reuse:
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=shapes, optimize=True, verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def quantize_int8(model: bytes, calibration: np.ndarray, batch: int = 32, activation: str = "u8", weight: str = "s8",
                  reduce_range: bool = True) -> bytes:
    """Static post-training quantization with ONNX Runtime: QDQ format, `weight` ("s8" or "u8")
    weights per output channel, 7-bit with `reduce_range` (the default: x86 CPUs without VNNI
    saturate full-range int8 weights), `activation` ("u8" or "s8") activations whose ranges are
    the min/max over `calibration` (N, C, H, W), normalised training images. The metadata is kept."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}

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
                            activation_type=types[activation], weight_type=types[weight], reduce_range=reduce_range,
                            calibrate_method=CalibrationMethod.MinMax)
        out = onnx.load(str(dst))
    original = onnx.load_from_string(model)
    if not out.metadata_props:
        out.metadata_props.extend(original.metadata_props)
    return out.SerializeToString()


def with_metadata(model: bytes, metadata: dict[str, str]) -> bytes:
    """`model` with `metadata` added to (or replacing the same keys of) its metadata_props."""
    import onnx

    proto = onnx.load_from_string(model)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnx_logits(model: bytes, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """`model`'s outputs on `inputs` (N, C, H, W), run with ONNX Runtime on one thread."""
    session = make_session(model, threads=1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])
