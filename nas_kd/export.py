"""The command line of `python -m nas_kd.export CHECKPOINT`: export a student checkpoint to ONNX and
int8 ONNX (`nas_kd.device.export`) and record the figures in metrics.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nas_kd.cli import base_parser, fail, quiet_libraries
from nas_kd.core.config import SearchConfig, from_dict
from nas_kd.core.errors import InputError
from nas_kd.data.datasets import load_dataset
from nas_kd.device.convert import require_runtime
from nas_kd.device.export import export_onnx, load_student, memory_facts, student_metadata, student_metrics
from nas_kd.device.int8 import TARGET_NAMES, int8_line, target_help

DESCRIPTION = ("Export a nas_kd student checkpoint to ONNX and int8 ONNX, check both with ONNX Runtime on the test "
               "images of the dataset it was trained on, and record their accuracy and latency in metrics.json.")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m nas_kd.export", DESCRIPTION)
    parser.add_argument("checkpoint", type=Path, help="a model.safetensors written by nas_kd")
    parser.add_argument("--out", type=Path, help="folder for model.onnx, model.int8.onnx and metrics.json "
                                                  "(default: the checkpoint's folder)")
    parser.add_argument("--data-dir", help="where the dataset is, when not where the search found it")
    parser.add_argument("--no-int8", action="store_true", help="write model.onnx only")
    parser.add_argument("--int8-target", choices=TARGET_NAMES, metavar="CPU",
                        help=f"the CPU model.int8.onnx is quantized for (default: the run's, else x86): {target_help()}")
    parser.add_argument("--latency-threads", type=int, default=1, help="ONNX Runtime threads for the latency (default 1)")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        if args.latency_threads < 1:
            raise InputError(f"--latency-threads must be >= 1, got {args.latency_threads}")
        require_runtime()
        model, meta = load_student(args.checkpoint)
        cfg = from_dict(SearchConfig, meta["config"])
        data_dir = args.data_dir or cfg.data_dir
        dataset = load_dataset(cfg.dataset, Path(data_dir) if data_dir else None)
        if list(dataset.input_shape) != list(meta["input_shape"]) or list(dataset.classes) != list(meta["classes"]):
            raise InputError(f"dataset {cfg.dataset} has input {'x'.join(map(str, dataset.input_shape))} and "
                             f"{dataset.num_classes} classes; {args.checkpoint} was trained on "
                             f"{'x'.join(map(str, meta['input_shape']))} with {len(meta['classes'])}")
        out = args.out or args.checkpoint.parent
        metrics = {**meta.get("metrics", {}), **student_metrics(model, dataset), **memory_facts(model, dataset.input_shape)}
        target = args.int8_target or cfg.int8_target
        metrics.update(export_onnx(model, dataset, student_metadata(model, dataset, cfg.to_json()), out, cfg.seed,
                                   not args.no_int8, args.latency_threads, target))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    except InputError as e:
        return fail(str(e))
    if (line := int8_line(metrics)) is not None:
        print(f"int8: {line}", file=sys.stderr)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("onnx", "int8", "latency", "test_acc"))},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
