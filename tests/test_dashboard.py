"""The end-to-end study as optuna-dashboard serves it: the real server on 127.0.0.1, read through
its JSON API (`GET /api/studies`, `GET /api/studies/<id>`), compared with the storage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import E2E_STUDY

from nas_kd.nas.study import open_storage

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed: pip install -e '.[dashboard]'")

E2E_BUDGET = 12_000_000  # --flops-budget 12M in conftest.E2E_ARGS
COST_ATTRS = {"spec", "macs", "params", "macs_compression", "params_compression", "peak_memory_fp32",
              "peak_memory_int8", "weights_fp32", "weights_int8", "worker", "budget_use"}
# the latency is measured only of specs within the other bounds
TRAINED_ATTRS = COST_ATTRS | {"latency_ms", "val_acc_curve", "val_acc_raw", "val_acc", "score", "score_kind", "naswot", "synflow",
                              "train_seconds", "eval_seconds", "recipe"}
START_TIMEOUT = 30.0  # seconds for the server to answer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def dashboard(e2e_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """optuna-dashboard on the e2e storage; yields its base URL and stops it afterwards."""
    exe = Path(sys.executable).parent / "optuna-dashboard"
    port = _free_port()
    log_path = tmp_path_factory.mktemp("dashboard") / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(exe), e2e_run["url"], "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"optuna-dashboard exited with {server.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                _get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not answer within {START_TIMEOUT:.0f} s:\n"
                                f"{log_path.read_text()[-2000:]}")
                time.sleep(0.25)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def stored(e2e_run: dict) -> list[optuna.trial.FrozenTrial]:
    """The e2e trials as the storage holds them."""
    return optuna.load_study(study_name=E2E_STUDY, storage=open_storage(e2e_run["url"], heartbeat=False)).trials


@pytest.fixture(scope="module")
def served(dashboard: str) -> dict:
    """The dashboard's detail of the e2e study."""
    summaries = _get(f"{dashboard}/api/studies")["study_summaries"]
    ids = [s["study_id"] for s in summaries if s["study_name"] == E2E_STUDY]
    assert len(ids) == 1, summaries
    return _get(f"{dashboard}/api/studies/{ids[0]}")


def _attrs(trial: dict) -> dict[str, str]:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


def test_dashboard_lists_the_study(dashboard: str) -> None:
    summaries = _get(f"{dashboard}/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in summaries] == [(E2E_STUDY, ["maximize"])]


def test_dashboard_shows_every_trial(served: dict, stored: list[optuna.trial.FrozenTrial]) -> None:
    assert served["name"] == E2E_STUDY
    assert [(t["number"], t["state"]) for t in served["trials"]] == \
        [(t.number, t.state.name.capitalize()) for t in stored]


@pytest.mark.parametrize(("state", "keys"), [
    ("Complete", TRAINED_ATTRS),
    ("Pruned", COST_ATTRS),  # only over-budget rejections: too few trials for the median pruner to prune
])
def test_dashboard_trial_attributes(state: str, keys: set[str], served: dict,
                                    stored: list[optuna.trial.FrozenTrial]) -> None:
    """Each trial carries its spec and cost; trained ones also their accuracies and training time,
    with the values the storage holds, as the dashboard writes them (str for numbers, JSON for lists)."""
    trials = [t for t in served["trials"] if t["state"] == state]
    assert trials, f"no {state} trial in the e2e study"
    if state == "Complete":
        assert len(trials) == 2  # --trials 2
    for trial in trials:
        attrs, truth = _attrs(trial), stored[trial["number"]].user_attrs
        assert set(attrs) == keys, trial["number"]
        expected = {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, list) else str(v)
                    for k, v in truth.items()}
        assert attrs == expected
        if state == "Complete":
            assert trial["values"] == [truth["score"]]


def test_dashboard_feasibility_is_the_budget(served: dict) -> None:
    """The dashboard greys out infeasible trials from the legacy `constraints` list: feasible
    (every constraint <= 0) must be exactly MACs <= 12M, and over budget a positive relative excess."""
    trials = served["trials"]
    assert all(len(t["constraints"]) == 1 for t in trials)  # one bound (MACs); none missing
    macs = {t["number"]: int(_attrs(t)["macs"]) for t in trials}
    feasible = {t["number"] for t in trials if all(c <= 0 for c in t["constraints"])}
    assert feasible == {n for n, m in macs.items() if m <= E2E_BUDGET}
    over = [t for t in trials if t["number"] not in feasible]
    assert over, "the e2e search rejected no spec; this test needs at least one over-budget trial"
    for t in over:
        assert t["state"] == "Pruned" and "val_acc_curve" not in _attrs(t) and "score" not in _attrs(t)
        assert t["constraints"] == [macs[t["number"]] / E2E_BUDGET - 1.0]
