"""Teachers from files: the model a user already has, trained in any framework, as an ensemble member.

`--teacher PATH` takes an ONNX model (run with ONNX Runtime) or a program saved with
`torch.export.save` (run with torch on the run's device). Either gives logits only: it joins the
ensemble's soft targets like any member, and the feature losses use the members that expose feature
maps (the zoo's). Its input convention comes from the file's metadata where present (ONNX metadata
properties, or `torch.export.save`'s extra files): `nas_kd.input` is `dataset` (normalised as the
students' inputs are, by the dataset's per-channel mean and std: what nas_kd's own exports expect)
or `unit` (pixels / 255, in [0, 1]); `nas_kd.channels` is `rgb` or `bgr`. Otherwise `--teacher-input`
says it. Its MACs and parameters are counted from the graph by maintained libraries: ptflops (as
for every network of nas_kd) on the exported program, onnx-tool's profile on an ONNX graph.

A file is checked before any trial, and refused in one line naming what is wrong: not a model, a
pickle (never loaded: unpickling runs code), an input shape the data cannot fill, an output width
other than the data's classes, or outputs that are not finite.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nas_kd.core.errors import InputError
from nas_kd.data.datasets import Dataset
from nas_kd.nets.cost import MAC_BACKEND, Cost
from nas_kd.teaching.cache import Teacher
from nas_kd.training.train import accuracy, predict

INPUTS = ("dataset", "unit")  # what a file teacher takes: normalised as the students' inputs, or pixels / 255
CHANNELS = ("rgb", "bgr")
KINDS = {"onnx": "ONNX model", "export": "torch.export program"}
PROBE_IMAGES = 64  # validation images a file teacher is checked on before the ensemble uses it


@dataclass(frozen=True)
class Convention:
    """How a file teacher's input is made from a batch of the students' (normalised) inputs."""

    input: str = "dataset"
    channels: str = "rgb"

    @classmethod
    def read(cls, meta: dict[str, str], default_input: str, path: Path) -> Convention:
        value, channels = meta.get("nas_kd.input", default_input), meta.get("nas_kd.channels", "rgb")
        if value not in INPUTS or channels not in CHANNELS:
            raise InputError(f"teacher {path}: metadata nas_kd.input={value!r}, nas_kd.channels={channels!r}; "
                             f"accepted: input {' or '.join(INPUTS)}, channels {' or '.join(CHANNELS)}")
        return cls(value, channels)


class FileModel(nn.Module):
    """A teacher file as a module that maps the students' inputs to its logits (float32, on their
    device). It has no parameters to train and no feature maps."""

    def __init__(self, run, convention: Convention, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.run, self.convention = run, convention
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> FileModel:  # a program or a session has no training mode
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.convention.input == "unit":
            x = x * self.std + self.mean
        if self.convention.channels == "bgr":
            x = x.flip(1)
        return self.run(x).float().to(x.device)


def kind_of(path: Path) -> str:
    """"onnx" or "export", from the file's bytes (never its name); a pickle or anything else is refused."""
    if not path.is_file():
        raise InputError(f"teacher {path}: no such file")
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80":
        raise InputError(f"teacher {path} is a pickle (torch.save or similar), which is never loaded: unpickling runs "
                         "code. Save the model with torch.export.save or export it to ONNX")
    if head == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith(".pkl") for n in names) and not any("serialized_exported_program" in n or
                                                              n.endswith("archive_format") for n in names):
            raise InputError(f"teacher {path} is a torch.save archive (a pickle), which is never loaded: unpickling "
                             "runs code. Save the model with torch.export.save or export it to ONNX")
        return "export"
    return "onnx"


def _onnx(path: Path, default_input: str, device: torch.device):
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # protobuf and ORT raise many types for a file that is not a model
        raise InputError(f"teacher {path} is not an ONNX model or a torch.export program "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"teacher {path} takes {len(inputs)} inputs; a teacher takes one batch of images")
    name, shape = inputs[0].name, inputs[0].shape

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run, meta, shape, lambda input_shape: _onnx_cost(path, input_shape)


def _onnx_cost(path: Path, input_shape: tuple[int, int, int]) -> Cost:
    import onnx_tool

    model = onnx_tool.Model(str(path))
    name = model.graph.input[0] if isinstance(model.graph.input[0], str) else model.graph.input[0].name
    model.graph.shape_infer({name: np.zeros((1, *input_shape), dtype=np.float32)})
    model.graph.profile()
    macs = model.graph.macs[0] if isinstance(model.graph.macs, (list, tuple)) else model.graph.macs
    return Cost(int(macs), int(model.graph.params))


def _export(path: Path, default_input: str, device: torch.device):
    extra = {"nas_kd.input": "", "nas_kd.channels": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # a damaged or foreign archive raises many types
        raise InputError(f"teacher {path} is not a torch.export program "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    module = program.module().to(device)
    meta = {k: v for k, v in extra.items() if v}
    shape = [p.meta["val"].shape for p in program.graph.nodes if p.op == "placeholder"
             and p.name in program.graph_signature.user_inputs]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def cost(input_shape: tuple[int, int, int]) -> Cost:
        from ptflops import get_model_complexity_info

        macs, _ = get_model_complexity_info(_Counted(module), tuple(input_shape), as_strings=False,
                                            backend=MAC_BACKEND, print_per_layer_stat=False, verbose=False)
        return Cost(int(macs), sum(p.numel() for p in module.parameters()))

    return run, meta, (list(shape[0]) if len(shape) == 1 else None), cost


class _Counted(nn.Module):
    """An exported program for ptflops, which puts what it counts in eval mode (a program has none)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Counted:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _check_shape(path: Path, shape: list | None, input_shape: tuple[int, int, int]) -> None:
    """Refuse an input the data cannot fill: a fixed dimension other than the images' (C, H, W)."""
    if shape is None:
        return
    dims = [d if isinstance(d, int) else None for d in list(shape)[1:]]
    if len(dims) != 3 or any(d is not None and d != want for d, want in zip(dims, input_shape)):
        raise InputError(f"teacher {path} takes inputs of shape {list(shape)}, and the data's images are "
                         f"{'x'.join(map(str, input_shape))} (channels x height x width): the data cannot fill it")


def load_file_teacher(path: str | Path, dataset: Dataset, device: torch.device, default_input: str = "dataset") -> Teacher:
    """The teacher in `path`, checked on the data (see the module's docstring), as an ensemble member."""
    path = Path(path)
    if default_input not in INPUTS:
        raise InputError(f"--teacher-input {default_input!r}: accepted {', '.join(INPUTS)}")
    kind = kind_of(path)
    run, meta, shape, cost_of = (_onnx if kind == "onnx" else _export)(path, default_input, device)
    _check_shape(path, shape, dataset.input_shape)
    model = FileModel(run, Convention.read(meta, default_input, path), dataset.mean, dataset.std).to(device)
    probe = dataset.val.x[:PROBE_IMAGES]
    try:
        with torch.no_grad():
            out = predict(model, type(dataset.val)(probe, dataset.val.y[:PROBE_IMAGES]), dataset)
    except Exception as e:  # the runtime's own message says what did not fit
        raise InputError(f"teacher {path} cannot run on the data's images "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    if out.ndim != 2 or out.shape[1] != dataset.num_classes:
        raise InputError(f"teacher {path} outputs shape {list(out.shape)} for {len(probe)} images; expected "
                         f"({len(probe)}, {dataset.num_classes}): one logit per class of the data")
    if not torch.isfinite(out).all():
        raise InputError(f"teacher {path} outputs values that are not finite (NaN or inf) on validation images")
    val_logits = predict(model, dataset.val, dataset)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Teacher(f"{path.name}", model, cost_of(dataset.input_shape), accuracy(val_logits, dataset.val.y),
                   f"{KINDS[kind]} file", val_logits, str(path), digest)
