"""Shared fixtures: a few hundred Fashion-MNIST images as idx files, and one small finished search.

The mini dataset is cut from the Debian package's files (`apt-get install dataset-fashion-mnist`,
which .ci/run does) and written in the same idx format, so the real loader reads it via --data-dir.
"""

from __future__ import annotations

import atexit
import gzip
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from nas_kd.data.datasets import DEBIAN_FASHION_MNIST, _read_idx, load_dataset

ROOT = Path(__file__).resolve().parent.parent
MINI_TRAIN, MINI_TEST = 600, 200


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker runs torch on its share of the machine's cores, and passes the share
    to every command a test starts (`OMP_NUM_THREADS`, unless it is set already). Two workers of two
    threads each on two cores left OpenMP threads waiting on each other: the suite took twice as
    long (BENCHMARKS.md, *The test suite's time*)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        if os.environ["OMP_NUM_THREADS"].isdigit():
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def mini_fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST cut to 600 train / 200 test images, as idx.gz files."""
    out = tmp_path_factory.mktemp("fashion-mini")
    for split, n in (("train", MINI_TRAIN), ("t10k", MINI_TEST)):
        x = _read_idx(DEBIAN_FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")[:n]
        y = _read_idx(DEBIAN_FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz")[:n]
        write_idx(out / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", y)
    return out


@pytest.fixture(scope="session")
def mini_dataset(mini_fashion_dir: Path):
    return load_dataset("fashion-mnist", mini_fashion_dir)


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in `cwd`, as a user would run it: a process of its own, forked
    from a server that has the heavy imports done (tests/forkserver.py), or a new interpreter
    with NAS_KD_TEST_FORK=0 and where the run changes a variable read at an interpreter's start."""
    env = command_env()
    if os.environ.get("NAS_KD_TEST_FORK", "1") != "0":
        server = _fork_server()
        if server.startup_env == startup_env(env):
            return server.run(module, args, Path(cwd), env, timeout)
    return subprocess.run(command(module, args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def command(module: str, args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def command_env() -> dict[str, str]:
    """The environment a test's command runs in: the test's, unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "TORCH", "CUDA", "LD_")


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The variables an interpreter or its libraries read as they start."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES)}


SERVER_START_TIMEOUT = 300  # seconds for the server's imports (5.4 s measured on the 2-core machine)


class ForkServer:
    """The client of one tests/forkserver.py process (one per pytest-xdist worker)."""

    def __init__(self) -> None:
        env = command_env()
        self.startup_env = startup_env(env)
        self.process = subprocess.Popen(command("tests.forkserver", ()), cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        # {"ready": pid} once the imports are done; the only line then, so select sees it unbuffered
        if not select.select([self.process.stdout], [], [], SERVER_START_TIMEOUT)[0]:
            self.process.kill()
            raise RuntimeError(f"the test fork server did not start in {SERVER_START_TIMEOUT} s")
        self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the test fork server exited with status {self.process.wait()}")
        return json.loads(line)

    def run(self, module: str, args: tuple[str, ...], cwd: Path, env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            request = {"module": module, "args": list(args), "cwd": str(cwd.resolve()), "env": env, "out": str(out),
                       "err": str(err), "timeout": timeout}
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
                answer = self.read()
            except BaseException:  # the protocol may be out of step: the next run starts a new server
                self.process.kill()
                raise
            stdout, stderr = (p.read_text() if p.is_file() else "" for p in (out, err))
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(command(module, args), timeout, stdout, stderr)
        return subprocess.CompletedProcess(command(module, args), answer["code"], stdout, stderr)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


_server: ForkServer | None = None


def _fork_server() -> ForkServer:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server


def search_cli(work: Path, cache: Path, data_dir: Path, *args: str, name: str = "s") -> tuple[object, str]:
    """Run `python -m nas_kd.search ARGS` as study `name` in `work` with teacher cache `cache` on
    the mini dataset; it must succeed. Returns the study and the run's output."""
    import optuna

    result = run_cli("nas_kd.search", *TINY_DATA_FLAGS, *args, "--study-name", name, "--cache-dir", str(cache), "--data-dir",
                     str(data_dir), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'studies' / (name + '.db')}")
    return study, result.stdout + result.stderr


# The mini dataset's teachers and students train for a few steps, to test the plumbing: no
# raised epochs (--min-steps), no refusal of a teacher near chance (--teacher-min-gain), and
# BatchNorm recalibrated on 1 batch instead of 8 (recalibrating before each of a trial's 4
# validations took more of a tiny trial's time than its training).
# They sample the listed space of before the budget's edge, as drawn (smaller students, no repair
# priced each trial); tests/test_edge.py and the start-point search pass `AT_THE_EDGE` after them,
# and the search's default (the edge) is what a test run without these flags gets.
TINY_DATA_FLAGS = ("--min-steps", "0", "--teacher-min-gain", "0", "--bn-recalibration", "1",
                   "--search-space", "resnet-v1", "--budget-edge", "off")
AT_THE_EDGE = ("--search-space", "resnet", "--budget-edge", "on")

# The small search every end-to-end test reads: 2 trained trials of 1 epoch on 300 images. It
# samples the listed space of before the budget's edge, without the edge, so that some of its
# specs are over the budget (the dashboard's and report's infeasible trials);
# tests/test_edge.py runs the default search at the edge.
E2E_STUDY = "e2e"
E2E_ARGS = (*TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8", "--teacher-epochs", "1", "--trials", "2",
            "--trial-epochs", "1", "--subset", "300", "--final-epochs", "1", "--study-name", E2E_STUDY,
            "--seed", "3", "--quiet")


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' temporary folders
    share a parent; without xdist, the session's own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], subprocess.CompletedProcess]) -> tuple[Path, subprocess.CompletedProcess]:
    """`build(folder)` run once for the whole session, whichever worker comes first; the others
    wait for it under a file lock and read its result (a failed build fails every user)."""
    folder = shared_dir(tmp_path_factory, name)
    record = folder.with_suffix(".json")
    with FileLock(str(folder.with_suffix(".lock"))):
        if not record.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            result = build(folder)
            record.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
    done = json.loads(record.read_text())
    return folder, subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory, mini_fashion_dir: Path) -> dict:
    """The main command run once per session on the mini dataset (shared by the xdist workers):
    paths and the process result. Tests read it; one that writes to the study works on
    `copy_of_e2e`."""
    data_dir = shared_dir(tmp_path_factory, "fashion-mini-e2e")
    with FileLock(str(data_dir.with_suffix(".lock"))):
        if not data_dir.is_dir():
            shutil.copytree(mini_fashion_dir, data_dir)
    work, result = built_once(tmp_path_factory, "e2e", lambda work: run_cli(
        "nas_kd.search", *E2E_ARGS, "--data-dir", str(data_dir), cwd=work))
    assert result.returncode == 0, result.stderr[-3000:]
    return e2e_paths(work, result, data_dir)


def copy_of_e2e(e2e_run: dict, folder: Path) -> dict:
    """The e2e run's studies copied into `folder`, with the same keys as `e2e_run`: for a test that
    adds to the study or rewrites its files while other tests read the shared one."""
    shutil.copytree(e2e_run["out"], folder / "studies")
    return e2e_paths(folder, e2e_run["result"], e2e_run["data_dir"])


def e2e_paths(work: Path, result: subprocess.CompletedProcess, data_dir: Path) -> dict:
    out = work / "studies"
    return {"work": work, "out": out, "db": out / f"{E2E_STUDY}.db", "url": f"sqlite:///{out / (E2E_STUDY + '.db')}",
            "study_dir": out / E2E_STUDY, "result": result, "data_dir": data_dir}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
