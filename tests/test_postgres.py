"""A real PostgreSQL storage: two search workers share one study at the same time.

Starts a throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql` package; .ci/run
installs it) and stops it afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas_kd.nas.records import FAIL_ATTR, REPEAT_ATTR, WORKER_ATTR, was_trained
from nas_kd.nas.study import open_storage, study_training
from tests.conftest import E2E_ARGS, TINY_DATA_FLAGS

pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> str:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    # initdb refuses to run as root: run the server as the 'postgres' user Debian creates, in a
    # folder it can reach (pytest's tmp folders are private to root)
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="nas_kd-pg-"))
    root.chmod(0o777)
    data = root / "data"
    port = free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "nas", "-A", "trust"], check=True, capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(data.parent / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://nas@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # the three-worker test below shares a study too, and more: kept out of the default run for time
def test_two_workers_share_one_study(postgres_url: str, e2e_run: dict, tmp_path: Path) -> None:
    args = list(E2E_ARGS)
    args[args.index("--study-name") + 1] = "shared"
    args[args.index("--trials") + 1] = "2"
    cmd = [sys.executable, "-m", "nas_kd.search", *args, "--final-epochs", "0", "--storage", postgres_url,
           "--data-dir", str(e2e_run["data_dir"]), "--cache-dir", str(e2e_run["out"] / "cache")]
    workers = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url, heartbeat=False))
    trained = [t for t in study.trials if was_trained(t)]
    assert len(trained) >= 4  # each worker trained two
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert study.user_attrs["nas_kd"]["guarded"]["trial_epochs"] == 1
    assert not (tmp_path / "studies" / "shared.db").exists()  # nothing went to SQLite


def test_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    url = f"postgresql://nas@127.0.0.1:{free_port()}/postgres"
    result = run_cli("nas_kd.search", "--flops-budget", "20M", "--storage", url, "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot open storage {url!r}: ")


def test_three_workers_survive_a_killed_one_and_train_the_teacher_once(postgres_url: str, mini_fashion_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Three `--worker` processes share a study on PostgreSQL and an empty teacher cache; one is
    killed with SIGKILL in the middle of a trial. The others finish the study's trial count, the
    killed trial is failed (its heartbeat stopped) and retried once with the same spec, no trial is
    lost or duplicated, and the teacher was trained by one process only."""
    cache = tmp_path / "cache"  # empty: the teacher must be trained, by one worker
    target = 8
    cmd = [sys.executable, "-m", "nas_kd.search", *TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8",
           "--teacher-epochs", "1", "--trial-epochs", "2", "--subset", "300", "--study-name", "many", "--seed", "3",
           "--quiet", "--no-onnx", "--worker", "--study-trials", str(target), "--heartbeat", "2", "--storage",
           postgres_url, "--data-dir", str(mini_fashion_dir), "--cache-dir", str(cache)]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = []
    for i, log in enumerate(logs):
        (tmp_path / f"w{i}").mkdir()
        with open(log, "w") as out:
            workers.append(subprocess.Popen(cmd, cwd=tmp_path / f"w{i}", stdout=out, stderr=subprocess.STDOUT))
    victim = f"{socket.gethostname()}:{workers[0].pid}"
    storage = open_storage(postgres_url, heartbeat=False)
    killed = None
    try:
        deadline = time.time() + 300
        while killed is None and time.time() < deadline and workers[0].poll() is None:
            try:
                study = optuna.load_study(study_name="many", storage=storage)
                running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                           if t.user_attrs.get(WORKER_ATTR) == victim and "recipe" in t.user_attrs]
            except KeyError:  # the study is not created yet
                running = []
            if running:
                # distilling (the recipe is recorded as training starts): the trial trains for seconds
                workers[0].send_signal(signal.SIGKILL)
                killed = running[0].number
            time.sleep(0.2)
        assert killed is not None, "worker 0 ran no trial in time:\n" + logs[0].read_text()[-2000:]
        for w in workers[1:]:
            w.wait(timeout=600)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, log in zip(workers[1:], logs[1:]):
        assert w.returncode == 0, log.read_text()[-3000:]

    study = optuna.load_study(study_name="many", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len({t.number for t in trials}) == len(trials)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]  # none lost
    assert study_training(study) >= target
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and FAIL_ATTR not in dead.user_attrs  # stale, not a failure inside
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params
    # trained again; or, when another worker trained the same spec meanwhile, its score reused
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert was_trained(retries[0]) or REPEAT_ATTR in retries[0].user_attrs
    spec = dead.user_attrs["spec"]
    assert sum(t.user_attrs.get("spec") == spec and was_trained(t) for t in trials) == 1  # trained once again
    text = "".join(log.read_text() for log in logs)
    assert text.count("training teacher resnet8") == 1, text[-3000:]
    assert len(list((cache / "teachers").glob("resnet8-*.safetensors"))) == 1
    assert "python -m nas_kd.retrain --study-name many" in logs[1].read_text()  # what to run once, after
    assert not (tmp_path / "w1" / "studies" / "many").exists()  # workers write no report
