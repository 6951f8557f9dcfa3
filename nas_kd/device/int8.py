"""int8 settings per target CPU: which quantization holds on the CPU a model will run on, chosen
on the validation split against the fp32 model, and said in the file.

ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights. Without VNNI (AVX2, and
AVX-512 without VNNI) they add pairs of those products in 16 bits (VPMADDUBSW), which saturates
with full-range int8 weights: on a 2-core AVX2 machine the main command's winner lost 2.03 points
of test accuracy in int8 and none with 7-bit weights (`reduce_range`). With VNNI the products are
added in 32 bits and full range is safe. On 64-bit ARM, ONNX Runtime recommends signed int8 for
both activations and weights (S8S8 QDQ), with uint8 activations as the fallback.

A target names the CPUs a model is meant for and the settings that qualify there
(`TARGETS`); `quantize_for` quantizes with each, measures each one's agreement with fp32 on
validation images on this machine, and keeps the best; a later candidate (listed after the
faster ones) must beat an earlier one by more than `PREFER_MARGIN`.
The default target, `x86`, is any x86-64 CPU: its settings never saturate. `auto` is the CPU
running the export.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import numpy as np

from nas_kd.core.errors import InputError
from nas_kd.device.convert import onnx_logits, quantize_int8, with_metadata

AGREEMENT_WARN = 0.99  # an int8 model that agrees with fp32 on fewer validation images than this is flagged
CHECK_IMAGES = 2000  # validation images the candidates are checked on (all of a smaller split)
# a later (slower) candidate is kept over an earlier one only when it agrees with fp32 on more than
# this share of the images more: on the AVX2 machine uint8 weights agreed on 0.04% more of wrn16_2's
# validation images than 7-bit int8 ones and ran at 0.98x fp32's speed against 1.44x
PREFER_MARGIN = 0.002


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    """One way to quantize: QDQ, weights per output channel, activations calibrated by min/max."""

    name: str
    activation: str  # "u8" or "s8"
    weight: str  # "s8" or "u8"
    reduce_range: bool  # 7-bit weights: no 16-bit saturation in x86's u8 x s8 kernels without VNNI

    def describe(self) -> str:
        weights = f"{self.weight} weights per channel" + (", 7-bit (reduce_range)" if self.reduce_range else ", full range")
        return f"QDQ, {self.activation} activations (min/max), {weights}"


SETTINGS = {s.name: s for s in (
    Int8Settings("s8-7bit", "u8", "s8", True),
    Int8Settings("u8u8", "u8", "u8", False),
    Int8Settings("s8-full", "u8", "s8", False),
    Int8Settings("s8s8", "s8", "s8", False),
)}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    help: str
    candidates: tuple[str, ...]  # SETTINGS names, the preferred (faster) first


TARGETS = {t.name: t for t in (
    Target("x86", "any x86-64 CPU (default): 7-bit int8 weights, or uint8 weights, which no x86 kernel saturates",
           ("s8-7bit", "u8u8")),
    Target("x86-avx2", "x86-64 without VNNI (AVX2, or AVX-512 without VNNI): as x86", ("s8-7bit", "u8u8")),
    Target("x86-vnni", "x86-64 with AVX-512 VNNI or AVX-VNNI: full-range int8 weights (wrong on CPUs without VNNI)",
           ("s8-full", "s8-7bit")),
    Target("arm64", "64-bit ARM (NEON): ONNX Runtime's recommended signed int8 activations and weights, or uint8 "
                    "activations", ("s8s8", "s8-full")),
)}
AUTO = "auto"  # the CPU running the export
DEFAULT_TARGET = "x86"
TARGET_NAMES = (*TARGETS, AUTO)


def target_help() -> str:
    """What --int8-target's values mean, for --help."""
    return "; ".join([f"{t.name}: {t.help}" for t in TARGETS.values()]
                     + [f"{AUTO}: the CPU running the export ({', '.join(TARGETS)} by its instruction set)"])


def check_target(name: str) -> str:
    if name not in TARGETS and name != AUTO:
        raise InputError(f"unknown --int8-target {name!r}; known: {', '.join([*TARGETS, AUTO])}")
    return name


# ---------------------------------------------------------------- this machine's instruction set


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, frozenset[str]]:
    """This CPU's architecture ("x86_64", "aarch64", ...) and the features int8 kernels depend on:
    AVX2, AVX-512, VNNI on x86; NEON, dot product on ARM. `cpuinfo` and `machine` stand in for
    /proc/cpuinfo and `platform.machine()` (tests)."""
    machine = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: the architecture alone
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    found = {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
             "VNNI": bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags),
             "NEON": "asimd" in flags or (arch == "aarch64" and not flags), "dot product": "asimddp" in flags}
    return arch, frozenset(k for k, v in found.items() if v)


def instruction_set(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """This CPU as int8 sees it, e.g. "x86_64 AVX2" or "x86_64 AVX2, AVX-512, VNNI"."""
    arch, features = cpu_features(cpuinfo, machine)
    order = ("AVX2", "AVX-512", "VNNI", "NEON", "dot product")
    return " ".join([arch, ", ".join(f for f in order if f in features)]).strip()


def resolve_target(name: str, cpuinfo: str | None = None, machine: str | None = None) -> Target:
    """The target `name` names; `auto`: this CPU's (x86-vnni, x86-avx2 or arm64; x86 elsewhere)."""
    check_target(name)
    if name != AUTO:
        return TARGETS[name]
    arch, features = cpu_features(cpuinfo, machine)
    if arch == "aarch64":
        return TARGETS["arm64"]
    if arch in ("x86_64", "i686", "i386"):
        return TARGETS["x86-vnni" if "VNNI" in features else "x86-avx2"]
    return TARGETS[DEFAULT_TARGET]


# ---------------------------------------------------------------- the choice


@dataclasses.dataclass(frozen=True)
class Int8Choice:
    model: bytes  # the kept int8 model, its metadata saying all of the below
    target: str
    settings: Int8Settings
    checked_on: str  # instruction_set() of the machine that measured the agreements
    agreement: float  # of the kept model's top-1 with fp32's on the check images
    check_images: int
    candidates: dict[str, float]  # every candidate's agreement

    def facts(self) -> dict[str, object]:
        """What metrics.json records of the choice."""
        return {"int8_target": self.target, "int8_settings": self.settings.describe(),
                "int8_settings_name": self.settings.name, "int8_checked_on": self.checked_on,
                "int8_val_agreement": self.agreement, "int8_val_images": self.check_images,
                "int8_candidates": self.candidates}

    def metadata(self) -> dict[str, str]:
        """What model.int8.onnx says of itself."""
        return {"int8_target": self.target, "int8_settings": self.settings.describe(),
                "int8_checked_on": self.checked_on, "int8_val_agreement": f"{self.agreement:.4f}",
                "int8_val_images": str(self.check_images)}

    def warning(self) -> str | None:
        """One line when the kept model agrees with fp32 on too few validation images, naming what helps."""
        if self.agreement >= AGREEMENT_WARN:
            return None
        helps = ("--no-int8 ships fp32 only" if self.target in ("x86", "x86-avx2")
                 else "--int8-target x86 chooses settings that hold on every x86-64 CPU")
        return (f"warning: the int8 model agrees with fp32 on {self.agreement:.1%} of {self.check_images} validation "
                f"images on this CPU ({self.checked_on}; {self.settings.describe()}), under {AGREEMENT_WARN:.0%}: {helps}")


def quantize_for(fp32: bytes, calibration: np.ndarray, check: np.ndarray, target: str) -> Int8Choice:
    """`fp32` quantized with each of `target`'s settings (calibrated on `calibration`, normalised
    training images); each checked against fp32 on `check` (normalised validation images, never
    test ones) on this machine; the best agreement kept, an earlier (faster) one unless a later one
    agrees on more than PREFER_MARGIN more of the images."""
    chosen = resolve_target(target)
    reference = onnx_logits(fp32, check).argmax(1)
    best: tuple[float, Int8Settings, bytes] | None = None
    agreements: dict[str, float] = {}
    for name in chosen.candidates:
        settings = SETTINGS[name]
        model = quantize_int8(fp32, calibration, activation=settings.activation, weight=settings.weight,
                              reduce_range=settings.reduce_range)
        agreements[name] = float((onnx_logits(model, check).argmax(1) == reference).mean())
        if best is None or agreements[name] > best[0] + PREFER_MARGIN:
            best = (agreements[name], settings, model)
    assert best is not None, "every target has a candidate"
    choice = Int8Choice(best[2], chosen.name, best[1], instruction_set(), best[0], len(check), agreements)
    return dataclasses.replace(choice, model=with_metadata(best[2], choice.metadata()))


def int8_line(metrics: dict[str, Any]) -> str | None:
    """The int8 model in one line: its settings, where they were checked, its agreement with fp32 on
    validation, its test accuracy change and its speed against fp32 here (saying so when it is
    not faster); None without an int8 model."""
    if "int8_test_acc" not in metrics:
        return None
    speed = metrics["latency_ms_fp32"] / metrics["latency_ms_int8"]
    faster = (f"{speed:.2f}x the speed of fp32" if speed > 1
              else f"not faster than fp32 on this machine ({metrics['latency_ms_int8']:.3f} against "
                   f"{metrics['latency_ms_fp32']:.3f} ms)")
    where = (f"target {metrics['int8_target']}, {metrics['int8_settings']}, checked on {metrics['int8_checked_on']}: "
             f"agrees with fp32 on {metrics['int8_val_agreement']:.1%} of validation images; "
             if "int8_target" in metrics else "")
    return f"{where}test accuracy {-metrics['int8_accuracy_drop']:+.2f} points, {faster}"

