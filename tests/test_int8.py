"""int8 per target CPU: the instruction set read from /proc/cpuinfo, the target each name
resolves to, the choice among a target's settings on validation images, and the warning when the
kept model agrees with fp32 on too few of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_kd.core.errors import InputError
from nas_kd.device import int8
from nas_kd.device.convert import onnx_logits, to_onnx
from nas_kd.nets.arch import Spec, build

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_VNNI = "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
AVX_VNNI = "flags\t\t: fpu avx avx2 avx_vnni\n"
ARM_DOT = "Features\t: fp asimd evtstrm aes crc32 asimddp\n"


@pytest.mark.parametrize(("cpuinfo", "machine", "isa", "target"), [
    (AVX2, "x86_64", "x86_64 AVX2", "x86-avx2"),
    (AVX512_VNNI, "x86_64", "x86_64 AVX2, AVX-512, VNNI", "x86-vnni"),
    (AVX_VNNI, "AMD64", "x86_64 AVX2, VNNI", "x86-vnni"),
    (ARM_DOT, "aarch64", "aarch64 NEON, dot product", "arm64"),
    ("", "arm64", "aarch64 NEON", "arm64"),
    ("", "riscv64", "riscv64", "x86"),
])
def test_the_instruction_set_and_the_auto_target(cpuinfo: str, machine: str, isa: str, target: str) -> None:
    assert int8.instruction_set(cpuinfo, machine) == isa
    assert int8.resolve_target("auto", cpuinfo, machine).name == target


def test_named_targets_ignore_the_machine_and_unknown_ones_are_refused() -> None:
    assert int8.resolve_target("x86-vnni", AVX2, "x86_64").candidates == ("s8-full", "s8-7bit")
    # the default target never uses full-range int8 weights: they saturate without VNNI
    assert not any(int8.SETTINGS[n].weight == "s8" and not int8.SETTINGS[n].reduce_range
                   for n in int8.TARGETS[int8.DEFAULT_TARGET].candidates)
    with pytest.raises(InputError, match=r"unknown --int8-target 'x86-sse'; known: x86, x86-avx2, x86-vnni, arm64, auto"):
        int8.check_target("x86-sse")
    help_text = int8.target_help()
    assert all(f"{name}:" in help_text for name in int8.TARGET_NAMES)


@pytest.fixture(scope="module")
def fp32_model() -> tuple[bytes, np.ndarray]:
    """A seeded untrained student as ONNX, and 64 random images for it."""
    torch.manual_seed(0)
    model = build(Spec.parse("c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1"), (1, 12, 12), 10, channels_last=False)
    images = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    return to_onnx(model.eval(), (1, 12, 12)), images


def test_the_choice_is_checked_on_the_images_given_and_said_in_the_file(fp32_model) -> None:
    import onnx

    fp32, images = fp32_model
    choice = int8.quantize_for(fp32, images[:32], images[32:], "x86")
    assert set(choice.candidates) == {"s8-7bit", "u8u8"} and choice.check_images == 32
    # the kept one is the best of the candidates, the earlier (faster) one unless a later one is
    # better by more than the margin
    first, second = choice.candidates["s8-7bit"], choice.candidates["u8u8"]
    assert choice.settings.name == ("u8u8" if second > first + int8.PREFER_MARGIN else "s8-7bit")
    assert choice.agreement == choice.candidates[choice.settings.name]
    # its agreement is measured, not copied: the kept model's top-1 against fp32's on the check images
    kept = onnx_logits(choice.model, images[32:]).argmax(1)
    assert choice.agreement == float((kept == onnx_logits(fp32, images[32:]).argmax(1)).mean())
    meta = {p.key: p.value for p in onnx.load_from_string(choice.model).metadata_props}
    assert meta["int8_target"] == "x86" and meta["int8_settings"] == choice.settings.describe()
    assert meta["int8_checked_on"] == int8.instruction_set() and meta["int8_val_images"] == "32"
    facts = choice.facts()
    assert facts["int8_candidates"] == choice.candidates and facts["int8_settings_name"] == choice.settings.name


def test_a_broken_calibration_is_warned_of_in_one_line_naming_a_flag(fp32_model) -> None:
    fp32, images = fp32_model
    # calibrated on blank images: every activation range is 0, so the int8 model's outputs are constant
    choice = int8.quantize_for(fp32, np.zeros_like(images[:32]), images[32:], "x86-vnni")
    assert choice.agreement < int8.AGREEMENT_WARN
    warning = choice.warning()
    assert warning is not None and len(warning.splitlines()) == 1
    assert warning.startswith("warning: the int8 model agrees with fp32 on") and "--int8-target x86" in warning
    default = int8.quantize_for(fp32, np.zeros_like(images[:32]), images[32:], "x86")
    assert "--no-int8" in default.warning()


def test_int8_line_says_when_int8_is_not_faster() -> None:
    metrics = {"int8_test_acc": 0.9, "latency_ms_fp32": 0.5, "latency_ms_int8": 0.6, "int8_accuracy_drop": 0.25,
               "int8_target": "x86", "int8_settings": "QDQ", "int8_checked_on": "x86_64 AVX2",
               "int8_val_agreement": 0.995}
    line = int8.int8_line(metrics)
    assert "not faster than fp32 on this machine (0.600 against 0.500 ms)" in line
    assert "test accuracy -0.25 points" in line and "99.5% of validation images" in line
    assert "2.00x the speed of fp32" in int8.int8_line({**metrics, "latency_ms_int8": 0.25})
    assert int8.int8_line({"onnx_test_acc": 0.9}) is None


def test_the_device_script_checks_int8_without_torch(fp32_model, tmp_path: Path) -> None:
    """time_blocks.py runs alone (no torch, no nas_kd) and compares int8 with fp32 on given images."""
    fp32, images = fp32_model
    choice = int8.quantize_for(fp32, images[:32], images[32:], "x86")
    (tmp_path / "model.onnx").write_bytes(fp32)
    (tmp_path / "model.int8.onnx").write_bytes(choice.model)
    np.save(tmp_path / "check.npy", images[32:])
    script = Path(int8.__file__).with_name("time_blocks.py")
    # torch and nas_kd made unimportable: the script must not need them
    guard = "import sys; sys.modules['torch'] = None; sys.modules['nas_kd'] = None; sys.argv[0] = 'time_blocks.py'; "
    run = subprocess.run([sys.executable, "-c", guard + f"exec(open({str(script)!r}).read())",
                          "--model", "model.int8.onnx", "--reference", "model.onnx", "--images", "check.npy",
                          "--runs", "50", "--passes", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["images"] == 32 and out["agreement"] == pytest.approx(choice.agreement)
    bad = subprocess.run([sys.executable, str(script), "--model", "model.int8.onnx", "--reference", "model.onnx",
                          "--images", "model.onnx"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "cannot read model.onnx" in bad.stderr
