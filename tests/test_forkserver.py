"""The tests' fork server (tests/forkserver.py) answers as a new interpreter would."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli


def test_a_forked_command_prints_and_exits_as_a_new_interpreter(tmp_path: Path, monkeypatch) -> None:
    forked = [run_cli("nas_kd.search", *args, cwd=tmp_path) for args in (["--help"], ["--flops-budget", "x"])]
    monkeypatch.setenv("NAS_KD_TEST_FORK", "0")
    fresh = [run_cli("nas_kd.search", *args, cwd=tmp_path) for args in (["--help"], ["--flops-budget", "x"])]
    assert [(r.returncode, r.stdout, r.stderr) for r in forked] == [(r.returncode, r.stdout, r.stderr) for r in fresh]
    assert [r.returncode for r in forked] == [0, 2]


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("timeit", "-n", "1", "import time; time.sleep(30)", cwd=tmp_path, timeout=1)
    done = run_cli("timeit", "-n", "1", "-r", "1", "pass", cwd=tmp_path)
    assert done.returncode == 0 and "loop" in done.stdout  # the server answers the next run in step


def test_a_command_reads_its_folder_and_environment(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "here.txt").write_text("x")
    monkeypatch.setenv("NAS_KD_PROBE", "42")
    check = "import os; assert os.path.exists('here.txt') and os.environ['NAS_KD_PROBE'] == '42'"
    result = run_cli("timeit", "-n", "1", "-r", "1", check, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("NAS_KD_PROBE", "41")
    assert run_cli("timeit", "-n", "1", "-r", "1", check, cwd=tmp_path).returncode == 1  # the check can fail
