"""`python -m nas_kd.latency blocks|measure`: the layers of a search space as ONNX models to time
on a target device, and the latency and memory of one spec on this machine (see `nas_kd.device.latency`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nas_kd.cli import base_parser, fail, quiet_libraries
from nas_kd.core.errors import InputError
from nas_kd.core.progress import log
from nas_kd.device.convert import require_runtime
from nas_kd.device.latency import MIN_CALIBRATION, PRECISIONS, LatencyTable, measure_latency
from nas_kd.device.layers import CALIBRATION_NETWORKS, export_blocks, space_layers
from nas_kd.device.memory import memory_facts
from nas_kd.nas.start import FAMILY_STEPS, family_specs
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.space import load_space


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
    b.add_argument("--with-hand-made", action="store_true",
                   help="also export the layers of the hand-made family (ResNet-8/14/20 and MobileNetV2 at every "
                        "width `--start-from hand-made` and benchmarks/device_budgets.py scale them to), so the "
                        "table prices those networks too")
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
            extra = [spec for name in FAMILY_STEPS for spec in family_specs(name)] if args.with_hand_made else []
            log(f"exporting {len(layers)} layers and {args.networks} calibration networks of space {space.name} at "
                f"input {args.input} ({', '.join(precisions)})"
                + (f", and the layers of {len(extra)} hand-made networks" if extra else ""))
            export_blocks(space, shape, args.classes, args.out, precisions, networks=args.networks, extra=extra)
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
