"""Time a folder of block models with ONNX Runtime on this device and write a latency table.

Stand-alone: this file needs only Python 3.8+, numpy and onnxruntime (no torch, no nas_kd, no
dataset), so it runs on the device a student will ship to. `python -m nas_kd.latency blocks`
writes the folder (the block models, `manifest.json` and a copy of this file); copy the folder to
the device and run there

    python3 time_blocks.py BLOCKS_DIR --out table.json [--threads 1] [--runs 100] [--passes 3]

then bring `table.json` back and pass it to the search: `--latency-table table.json`.

It also times one exported model where it will run, and checks an int8 model there: the export
writes `check_images.npy` (normalised validation images) beside `model.onnx` and
`model.int8.onnx`; on the device

    python3 time_blocks.py --model model.int8.onnx --reference model.onnx --images check_images.npy

prints both latencies and the share of the images on which the int8 model's top-1 class is the
fp32 model's: int8 kernels differ between CPUs (x86 without VNNI saturates full-range int8
weights), so whether int8 holds is a fact of the device, not of the machine that exported it.

Every model is timed as the search times whole students (`nas_kd.device.latency.measure_latency` calls
`latency_ms` below): one input of batch 1, `threads` intra-op threads, sequential execution, all
graph optimisations, `warmup` runs, then the median of `runs` timed runs, in milliseconds; that
`passes` times, and the fastest of those medians is kept. A shared or busy machine slows some
passes down by 5-20% for seconds at a time; the fastest pass is the model's own cost. Here the
passes go round the whole folder (every model once, then again, warmed up each time), so a slow
spell hits one pass of many models rather than every pass of one.

The folder also holds a dozen whole networks of the space (the calibration networks): timed
beside the layers, they let nas_kd fit how a sum of separately timed layers relates to a whole
network's latency on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TABLE_FORMAT = "nas_kd.latency_table"
MANIFEST_FORMAT = "nas_kd.latency_blocks"
MIN_RUNS = 50
PASSES = 3  # timings of a model whose fastest is kept


def make_session(model, threads: int = 1):
    """An ONNX Runtime CPU session for `model` (a path or the serialized bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def median_ms(session, warmup: int = 10, runs: int = 100, seed: int = 0) -> float:
    """Median wall time of one run of `session` on one random input of batch 1, in milliseconds."""
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be >= {MIN_RUNS}, got {runs}")
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]  # a named (dynamic) batch -> 1
    feed = {inp.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def latency_ms(session: Any, warmup: int = 10, runs: int = 100, passes: int = PASSES) -> float:
    """The fastest of `passes` medians of `session` (`median_ms`), in milliseconds: what nas_kd
    calls a model's latency. The passes run back to back, so the warm-up runs once."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    return min(median_ms(session, warmup if i == 0 else 0, runs) for i in range(passes))


def time_round_robin(sessions: dict[Any, Any], warmup: int = 10, runs: int = 100, passes: int = PASSES,
                     log: Callable[[str], None] | None = None) -> dict[Any, float]:
    """The fastest of `passes` medians of every session, in rounds over all of them (each round
    times every session once), so a slow spell of the machine slows one round of many models, not
    every round of a few. Every round warms a model up again: the others ran since its last one."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    best: dict[Any, float] = {}
    for i in range(passes):
        for key, session in sessions.items():
            ms = median_ms(session, warmup, runs)
            best[key] = min(ms, best.get(key, ms))
        if log:
            log(f"pass {i + 1}/{passes}: timed {len(sessions)} models")
    return best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(threads: int) -> dict:
    """What the table was measured on, stored in it for the user's records."""
    import onnxruntime as ort

    return {"machine": platform.machine(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "system": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"], "threads": threads,
            "hostname": platform.node()}


def time_folder(folder: Path, threads: int = 1, warmup: int = 10, runs: int = 100, passes: int = PASSES,
                log=print) -> dict:
    """The latency table of the block models (and calibration networks) listed in
    `folder`/manifest.json."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {manifest_path} ({e}); expected the folder written by "
                         "python -m nas_kd.latency blocks") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path} is not a nas_kd block manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                         f"{MANIFEST_FORMAT!r})")
    entries: dict = {}
    networks: dict = {}
    for precision, files in manifest["files"].items():
        nets = manifest.get("networks", {}).get(precision, {})
        sessions = {("layer", key): make_session(str(folder / name), threads) for key, name in files.items()}
        sessions.update({("network", spec): make_session(str(folder / name), threads) for spec, name in nets.items()})
        timed = time_round_robin(sessions, warmup, runs, passes,
                                 log=lambda m, p=precision: log(f"{p} {m}"))
        entries[precision] = {key: round(ms, 5) for (kind, key), ms in timed.items() if kind == "layer"}
        networks[precision] = {key: round(ms, 5) for (kind, key), ms in timed.items() if kind == "network"}
    table = {k: manifest[k] for k in ("space", "space_fingerprint", "input_shape", "num_classes", "noop")}
    table.update({"format": TABLE_FORMAT, "device": describe_device(threads), "threads": threads,
                  "warmup": warmup, "runs": runs, "passes": passes, "entries": entries, "networks": networks})
    return table


def top1(session, images: np.ndarray, batch: int = 1) -> np.ndarray:
    """The top-1 class of each image (N, C, H, W) through `session`, `batch` at a time (1 for a
    model exported with a static batch of 1)."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(images), batch)])


def check_model(model: Path, reference: Path | None, images: Path | None, threads: int = 1, warmup: int = 10,
                runs: int = 100, passes: int = PASSES) -> dict:
    """`model`'s latency here (and `reference`'s), and with `images` the share of them on which
    `model`'s top-1 class is `reference`'s."""
    session = make_session(str(model), threads)
    out: dict = {"model": str(model), "latency_ms": round(latency_ms(session, warmup, runs, passes), 4),
                 "device": describe_device(threads)}
    if reference is not None:
        ref = make_session(str(reference), threads)
        out["reference"], out["reference_latency_ms"] = str(reference), round(latency_ms(ref, warmup, runs, passes), 4)
        if images is not None:
            try:
                data = np.load(images).astype(np.float32)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {images} as a .npy array of images ({e})") from None
            want = [d for d in session.get_inputs()[0].shape[1:]]
            if data.ndim != 4 or [d for d in data.shape[1:]] != want:
                raise ValueError(f"{images} holds an array of shape {data.shape}; the model takes (N, {', '.join(map(str, want))})")
            batch = 1 if session.get_inputs()[0].shape[0] == 1 else 256
            out["images"], out["agreement"] = len(data), float((top1(session, data, batch) == top1(ref, data, batch)).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="time_blocks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, nargs="?", help="the folder written by python -m nas_kd.latency blocks")
    p.add_argument("--model", type=Path, help="instead of a folder: time this one ONNX model (e.g. model.int8.onnx)")
    p.add_argument("--reference", type=Path, help="with --model: time this model too (e.g. model.onnx) and compare")
    p.add_argument("--images", type=Path, help="with --model and --reference: a .npy of normalised images (the "
                                               "export's check_images.npy) on which to compare their top-1 classes")
    p.add_argument("--out", type=Path, default=Path("table.json"), help="where to write the table (default table.json)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=100, help=f"timed runs per model (>= {MIN_RUNS}; default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--passes", type=int, default=PASSES,
                   help=f"rounds over all models; each model's fastest round is kept (default {PASSES})")
    args = p.parse_args(argv)
    if args.threads < 1 or args.runs < MIN_RUNS or args.warmup < 0 or args.passes < 1:
        print(f"error: need --threads >= 1, --runs >= {MIN_RUNS}, --warmup >= 0, --passes >= 1; got {args.threads}, "
              f"{args.runs}, {args.warmup}, {args.passes}", file=sys.stderr)
        return 2
    if (args.folder is None) == (args.model is None) or (args.reference and not args.model) or \
            (args.images and not args.reference):
        print("error: give a folder of blocks, or --model (with --reference, and --images to compare them)",
              file=sys.stderr)
        return 2
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: onnxruntime is not installed here: pip install onnxruntime numpy", file=sys.stderr)
        return 2
    if args.model is not None:
        return print_check(args)
    try:
        table = time_folder(args.folder, args.threads, args.warmup, args.runs, args.passes,
                            log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: {sum(len(e) for e in table['entries'].values())} layer and "
          f"{sum(len(n) for n in table['networks'].values())} network timings on {table['device']['cpu']}")
    return 0


def print_check(args: argparse.Namespace) -> int:
    try:
        out = check_model(args.model, args.reference, args.images, args.threads, args.warmup, args.runs, args.passes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ONNX Runtime's own errors: a file that is not a model, a missing file
        print(f"error: cannot run {args.model}{' or ' + str(args.reference) if args.reference else ''}: "
              f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    line = f"{out['model']}: {out['latency_ms']:.3f} ms"
    if "reference" in out:
        line += f"; {out['reference']}: {out['reference_latency_ms']:.3f} ms"
    if "agreement" in out:
        line += f"; same top-1 class on {out['agreement']:.1%} of {out['images']} images"
    print(f"{line} ({out['device']['cpu']}, {args.threads} thread(s))")
    print(json.dumps({k: v for k, v in out.items() if k != "device"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
