"""A real PostgreSQL storage: two search workers share one study at the same time.

Starts a throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql` package; .ci/run
installs it) and stops it afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from nas_kd.objective import was_trained
from nas_kd.study import open_storage
from tests.conftest import E2E_ARGS

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
