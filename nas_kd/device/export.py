"""Export a trained student: safetensors weights, an ONNX model and an int8 ONNX model, each
checked with ONNX Runtime on the test images, and `metrics.json`.

    python -m nas_kd.export studies/<study>/winner/model.safetensors [--out DIR] [--no-int8]

Files of one export (OUT = the winner's, a baseline's or an online student's folder):

- `model.safetensors`: weights, with metadata that carries the spec, the input shape, the
  normalisation, the classes, the config and the library versions (`load_student` rebuilds the
  network from the file alone);
- `model.onnx`: the same network from `torch.onnx.export(dynamo=True)` (the torch.export-based
  exporter, which needs onnxscript), opset 20, input `input` (B, C, H, W) float32 normalised as
  `(pixels / 255 - mean) / std` per channel, output `logits` (B, classes), dynamic batch; the
  metadata (`spec`, `input_shape`, `mean`, `std`, `classes`, ...) is in the model's
  metadata_props. ONNX Runtime runs it on every test image: its logits must match torch's within
  `LOGIT_TOLERANCE`, and its test accuracy is recorded;
- `model.int8.onnx`: static post-training quantization with ONNX Runtime (QDQ, weights per
  channel, activations calibrated on `CALIBRATION_IMAGES` seeded training images, never test
  images), with the settings that hold on the int8 target (`nas_kd.device.int8`: by default any x86-64
  CPU), each candidate checked against fp32 on validation images and the best kept; its metadata
  says the settings, the target, the instruction set of the check and the agreement. Tested the
  same way;
- `check_images.npy`: `DEVICE_CHECK_IMAGES` normalised validation images, (N, C, H, W) float32,
  for the device script to check the int8 model against fp32 where it runs
  (`python3 time_blocks.py --model model.int8.onnx --reference model.onnx --images check_images.npy`);
- `metrics.json`: the student's and teachers' test figures, costs, memory, and per model its test
  accuracy and its latency here, measured on the delivered files (batch 1 through their dynamic
  batch, the fastest of 3 medians of 100 runs after 10 warm-up runs), and the int8 choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.progress import log
from nas_kd.core.versions import versions
from nas_kd.data.batches import BatchIterator, eval_batches, seeded_subset
from nas_kd.data.datasets import Dataset
from nas_kd.device.convert import EXPORTER, OPSET, onnx_logits, require_runtime, to_onnx
from nas_kd.device.int8 import CHECK_IMAGES, DEFAULT_TARGET, quantize_for
from nas_kd.device.memory import memory_facts
from nas_kd.device.time_blocks import latency_ms, make_session
from nas_kd.nets.arch import Network, Spec, build
from nas_kd.nets.weights import load_state, read_metadata, save_model
from nas_kd.teaching.ensemble import Ensemble, soft_targets
from nas_kd.training.train import accuracy, evaluate, predict

STUDENT_FORMAT = "nas_kd.student"
LOGIT_TOLERANCE = 1e-3  # most |ONNX Runtime - torch| logit difference, times max(1, largest |logit|)
CALIBRATION_IMAGES = 512  # training images whose activation ranges set the int8 scales
DEVICE_CHECK_IMAGES = 256  # validation images written beside the models for the device script's int8 check


def student_metrics(model: Network, dataset: Dataset) -> dict[str, float]:
    """A final student's test and validation accuracy."""
    return {"test_acc": evaluate(model, dataset.test, dataset), "val_acc": evaluate(model, dataset.val, dataset)}


def teachers_test_metrics(dataset: Dataset, ensemble: Ensemble) -> dict[str, Any]:
    """Each teacher's and the ensemble's test accuracy (the same for every student of a run)."""
    teacher_logits = torch.stack([predict(t.model, dataset.test, dataset) for t in ensemble.members])
    return {
        "teachers_test_acc": {t.name: accuracy(logits, dataset.test.y)
                              for t, logits in zip(ensemble.members, teacher_logits)},
        "ensemble_test_acc": accuracy(soft_targets(teacher_logits, 1.0, ensemble.weights), dataset.test.y),
    }


@dataclass(frozen=True)
class ExportSettings:
    """What an export writes: the run's settings (JSON, recorded in every file), whether the ONNX
    models are written, the seed of the int8 calibration images, ONNX Runtime's threads for the
    latencies, and the CPU the int8 model is quantized for."""

    config: str
    onnx: bool = True
    seed: int = 0
    threads: int = 1
    int8_target: str = DEFAULT_TARGET

    @classmethod
    def of(cls, cfg: SearchConfig) -> ExportSettings:
        return cls(cfg.to_json(), cfg.onnx, cfg.seed, cfg.latency_threads, cfg.int8_target)


def student_metadata(model: Network, dataset: Dataset, config: str) -> dict[str, str]:
    """What every exported file says about itself (strings, as safetensors and ONNX store them);
    `config`: the run's settings as JSON."""
    return {"format": STUDENT_FORMAT, "spec": str(model.spec), "spec_json": model.spec.to_json(),
            "input_shape": json.dumps(list(dataset.input_shape)), "num_classes": str(dataset.num_classes),
            "classes": json.dumps(list(dataset.classes)), "mean": json.dumps(dataset.mean),
            "std": json.dumps(dataset.std), "config": config, "versions": json.dumps(versions())}


def split_inputs(dataset: Dataset, split: str = "test", n: int | None = None) -> np.ndarray:
    """The first `n` (all: None) normalised images of a split, (N, C, H, W) float32, as the ONNX models take them."""
    images = getattr(dataset, split)
    images = images if n is None or n >= len(images) else images.subset(torch.arange(n))
    return torch.cat([x.cpu() for x, _ in eval_batches(images, dataset, channels_last=False)]).numpy()


def calibration_images(dataset: Dataset, seed: int, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """`n` seeded training images, un-augmented and normalised: int8 calibration data."""
    batches = BatchIterator(dataset.train, dataset, 1, seed, views=1, augment=False, channels_last=False)
    index = seeded_subset(len(dataset.train), n, seed).to(dataset.train.x.device)
    return batches.images(index, 0).cpu().numpy().astype(np.float32)


def export_onnx(model: Network, dataset: Dataset, meta: dict[str, str], out_dir: Path, seed: int = 0,
                int8: bool = True, threads: int = 1, int8_target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """`model.onnx` (and `model.int8.onnx` for `int8_target`, with `check_images.npy`) in out_dir,
    run with ONNX Runtime on the test images; returns their figures for metrics.json."""
    require_runtime()
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = split_inputs(dataset)
    reference = predict(model, dataset.test, dataset).cpu().numpy()
    labels = dataset.test.y.cpu().numpy()
    fp32 = to_onnx(model, dataset.input_shape, meta)
    (out_dir / "model.onnx").write_bytes(fp32)
    logits = onnx_logits(fp32, inputs)
    diff = float(np.abs(logits - reference).max())
    bound = LOGIT_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    facts: dict[str, Any] = {
        "onnx_file": str(out_dir / "model.onnx"), "onnx_exporter": EXPORTER, "onnx_opset": OPSET,
        "onnx_max_logit_diff": diff, "onnx_logit_tolerance": bound, "onnx_matches_torch": diff <= bound,
        "onnx_test_acc": float((logits.argmax(1) == labels).mean()),
        "latency_ms_fp32": round(latency_ms(make_session(fp32, threads)), 4), "latency_threads": threads}
    if diff > bound:
        log(f"warning: ONNX Runtime's logits differ from torch's by {diff:.3g} (> {bound:.3g}) in {out_dir / 'model.onnx'}")
    if int8:
        # the settings are chosen on validation images; the test images only measure the kept model
        val = split_inputs(dataset, "val", max(CHECK_IMAGES, DEVICE_CHECK_IMAGES))
        choice = quantize_for(fp32, calibration_images(dataset, seed), val[:CHECK_IMAGES], int8_target)
        (out_dir / "model.int8.onnx").write_bytes(choice.model)
        np.save(out_dir / "check_images.npy", val[:DEVICE_CHECK_IMAGES])
        int8_logits = onnx_logits(choice.model, inputs)
        facts.update({
            "int8_file": str(out_dir / "model.int8.onnx"), "int8_calibration_images": CALIBRATION_IMAGES,
            **choice.facts(),
            "int8_test_acc": float((int8_logits.argmax(1) == labels).mean()),
            "int8_agreement": float((int8_logits.argmax(1) == logits.argmax(1)).mean()),
            "latency_ms_int8": round(latency_ms(make_session(choice.model, threads)), 4)})
        facts["int8_accuracy_drop"] = round(100 * (facts["onnx_test_acc"] - facts["int8_test_acc"]), 2)  # points
        facts["int8_speedup"] = round(facts["latency_ms_fp32"] / facts["latency_ms_int8"], 3)
        if (warning := choice.warning()) is not None:
            log(warning)
    return facts


def export(model: Network, dataset: Dataset, settings: ExportSettings, metrics: dict[str, Any],
           out_dir: Path) -> tuple[Path, Path]:
    """`model.safetensors`, with `settings.onnx` `model.onnx` and `model.int8.onnx`, and
    `metrics.json` in out_dir; `metrics` gains the memory and ONNX figures."""
    meta = student_metadata(model, dataset, settings.config)
    metrics.update(memory_facts(model, dataset.input_shape))
    if settings.onnx:
        metrics.update(export_onnx(model, dataset, meta, out_dir, settings.seed, threads=settings.threads,
                                   int8_target=settings.int8_target))
    weights = out_dir / "model.safetensors"
    save_model(model, weights, {**meta, "metrics": json.dumps(metrics)})
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return weights, metrics_path


def load_student(path: str | Path) -> tuple[Network, dict[str, Any]]:
    """Rebuild an exported student from its file alone; returns (model in eval mode, metadata).

    Inputs are normalised as `(pixels / 255 - mean) / std` per channel with the stored mean/std.
    """
    path = Path(path)
    state = load_state(path)
    meta = read_metadata(path)
    if meta.get("format") != STUDENT_FORMAT:
        raise InputError(f"{path} is not a nas_kd student export (metadata format {meta.get('format')!r}, "
                         f"expected {STUDENT_FORMAT!r})")
    spec = Spec.from_json(meta["spec_json"])
    shape = tuple(json.loads(meta["input_shape"]))
    model = build(spec, shape, int(meta["num_classes"]), channels_last=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit the spec in its metadata ({str(e).splitlines()[0]})") from None
    decoded = {k: (json.loads(v) if k in ("input_shape", "classes", "mean", "std", "config", "versions", "metrics")
                   else v) for k, v in meta.items()}
    return model.eval(), decoded
