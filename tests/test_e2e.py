"""The command line end to end on a few hundred Fashion-MNIST images: storage, report, winner,
resume, refusal to mix settings, a killed run started again, retrain, pareto mode, export."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from nas_kd.core.config import SearchConfig
from nas_kd.data.datasets import load_dataset
from nas_kd.device.export import load_student
from nas_kd.nas.records import is_feasible, was_trained
from nas_kd.nas.study import guarded, open_storage, open_study, run, sampler_seed, shares_its_study
from nas_kd.training.train import evaluate
from tests.conftest import E2E_ARGS, E2E_STUDY, load_json, run_cli

TRIAL_ATTRS = {"spec", "macs", "params", "macs_compression", "params_compression", "val_acc_curve", "val_acc_raw",
               "val_acc", "score", "score_kind", "naswot", "synflow", "train_seconds", "eval_seconds"}


def load(url: str, name: str = E2E_STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))


@pytest.fixture
def e2e_copy(e2e_run: dict, tmp_path: Path) -> dict:
    """A private copy of the finished e2e search (storage, cached teacher, outputs) to run more on."""
    shutil.copytree(e2e_run["work"] / "studies", tmp_path / "studies")
    return {**e2e_run, "work": tmp_path, "url": f"sqlite:///{tmp_path / 'studies' / (E2E_STUDY + '.db')}"}


def test_storage_holds_every_trial_with_its_attributes(e2e_run: dict) -> None:
    study = load(e2e_run["url"])
    trained = [t for t in study.trials if was_trained(t)]
    assert len(trained) == 2  # --trials 2 counts trained trials only
    for t in study.trials:
        assert {"spec", "macs", "params", "macs_compression", "params_compression"} <= set(t.user_attrs)
        # Optuna 5's named constraint (no budget floor by default), and the legacy list
        # optuna-dashboard 0.21 reads (Optuna names it "0")
        assert set(t.constraints) == {"macs", "0"} and t.constraints["macs"] == t.constraints["0"]
        assert t.user_attrs["budget_use"] == pytest.approx(t.user_attrs["macs"] / 12_000_000, abs=1e-4)
        assert is_feasible(t) == (t.user_attrs["macs"] <= 12_000_000)
        if not was_trained(t):  # over budget: recorded, pruned, never trained
            assert t.state == optuna.trial.TrialState.PRUNED and not is_feasible(t)
    for t in trained:
        assert TRIAL_ATTRS <= set(t.user_attrs)
        a = t.user_attrs
        assert a["train_seconds"] > 0 and a["score_kind"] == "distill"
        # 4 reports at equal fractions of the steps, but 300 images make 2 steps: one after each
        assert [p[0] for p in a["val_acc_curve"]] == [0.5, 1.0]
        assert t.values[0] == a["val_acc_curve"][-1][1] == a["val_acc"] == a["score"]
        assert t.intermediate_values == {i + 1: p[1] for i, p in enumerate(a["val_acc_curve"])}
    assert "budget floor" not in e2e_run["result"].stderr  # off by default
    info = study.user_attrs["nas_kd"]
    assert info["budget_floor"] == 0.0
    assert [m["name"] for m in info["teachers"]] == ["resnet8"]
    assert info["budget"] == {"macs": 12_000_000, "params": None, "latency_ms": None, "memory": None}


def test_outputs_and_summary(e2e_run: dict) -> None:
    study_dir = e2e_run["study_dir"]
    for name in ("report.html", "trials.csv", "winner/model.safetensors", "winner/metrics.json"):
        assert (study_dir / name).is_file(), name
    metrics = load_json(study_dir / "winner" / "metrics.json")
    study = load(e2e_run["url"])
    best = max((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and is_feasible(t)),
               key=lambda t: (t.values[0], -t.user_attrs["macs"]))
    assert metrics["trial"] == best.number and metrics["spec"] == best.user_attrs["spec"]
    assert metrics["macs"] <= 12_000_000
    assert study.user_attrs["winner"]["test_acc"] == metrics["test_acc"]
    report = (study_dir / "report.html").read_text()
    assert f"<th>test acc</th><td>{metrics['test_acc']:.2%}</td>" in report
    assert "<th>path</th>" in report and "weights_sha256" not in report  # the digest is stored, not shown
    out = e2e_run["result"].stdout
    # 12M MACs admits students larger than resnet8 (9.346M): said once, at the start
    warnings = [line for line in e2e_run["result"].stderr.splitlines() if "warning: the budget admits" in line]
    assert warnings == ["[nas_kd] warning: the budget admits students larger than the largest teacher (12M MACs > "
                        "teacher resnet8's 9.346M): those would not compress it; lower the budget or use larger --teachers"]
    assert "nas_kd search finished" in out and f"trial {best.number}: {best.user_attrs['spec']}" in out
    assert "floor" not in out
    assert f"optuna-dashboard {e2e_run['url'].replace(str(e2e_run['work']) + '/', '')}" in out


def test_exported_student_reloads_from_its_file_alone(e2e_run: dict) -> None:
    model, meta = load_student(e2e_run["study_dir"] / "winner" / "model.safetensors")
    metrics = load_json(e2e_run["study_dir"] / "winner" / "metrics.json")
    assert str(model.spec) == metrics["spec"] and meta["metrics"]["test_acc"] == metrics["test_acc"]
    assert meta["input_shape"] == [1, 28, 28] and len(meta["classes"]) == 10
    assert {"torch", "optuna", "ptflops", "nas_kd"} <= set(meta["versions"])
    dataset = load_dataset("fashion-mnist", e2e_run["data_dir"])
    assert meta["mean"] == pytest.approx(list(dataset.mean))
    assert evaluate(model, dataset.test, dataset) == pytest.approx(metrics["test_acc"], abs=1e-6)


def test_the_main_command_ships_onnx_and_int8(e2e_run: dict) -> None:
    """The default run exports ONNX and int8 ONNX models that ONNX Runtime runs on the test images,
    records every trial's latency and memory, and draws the latency front."""
    import onnxruntime as ort

    winner = e2e_run["study_dir"] / "winner"
    metrics = load_json(winner / "metrics.json")
    assert metrics["onnx_matches_torch"] is True and metrics["onnx_opset"] == 20
    assert metrics["onnx_test_acc"] == pytest.approx(metrics["test_acc"], abs=0.01)
    assert 0 <= metrics["int8_test_acc"] <= 1 and metrics["latency_ms_fp32"] > 0 and metrics["latency_ms_int8"] > 0
    assert metrics["peak_memory_fp32"] == 4 * metrics["peak_memory_int8"] > 0
    session = ort.InferenceSession(str(winner / "model.int8.onnx"))
    assert session.get_modelmeta().custom_metadata_map["spec"] == metrics["spec"]
    study = load(e2e_run["url"])
    trained = [t for t in study.trials if was_trained(t)]
    assert trained and all(t.user_attrs["latency_ms"] > 0 and t.user_attrs["weights_int8"] > 0 for t in trained)
    report = (e2e_run["study_dir"] / "report.html").read_text()
    assert "vs latency (ms)" in report and "Deployment (ONNX Runtime" in report


def test_same_study_name_adds_trials_to_the_same_study(e2e_copy: dict) -> None:
    before = len([t for t in load(e2e_copy["url"]).trials if was_trained(t)])
    args = list(E2E_ARGS)
    args[args.index("--trials") + 1] = "1"
    result = run_cli("nas_kd.search", *args, "--final-epochs", "0", "--data-dir", str(e2e_copy["data_dir"]),
                     cwd=e2e_copy["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    study = load(e2e_copy["url"])
    assert len([t for t in study.trials if was_trained(t)]) == before + 1
    assert len(optuna.get_all_study_summaries(study._storage)) == 1
    assert "(cache: " in result.stderr  # the teacher was not trained again
    assert (f"--final-epochs 0: nothing retrained; to retrain its winner: python -m nas_kd.retrain --study-name "
            f"{E2E_STUDY} --storage 'sqlite:///") in result.stderr
    # the command it gives retrains for the default epochs, not the 0 the study now records
    assert study.user_attrs["nas_kd"]["config"]["final_epochs"] == 0
    result = run_cli("nas_kd.retrain", "--study-name", E2E_STUDY, "--storage", e2e_copy["url"], "--no-onnx", "--quiet",
                     "--out-dir", str(e2e_copy["work"] / "retrained"), cwd=e2e_copy["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the search ran with --final-epochs 0: retraining for the default 3 epochs" in result.stderr
    assert json.loads(result.stdout)["final_epochs"] == 3


def test_resuming_with_other_settings_is_refused(e2e_copy: dict) -> None:
    args = list(E2E_ARGS)
    args[args.index("--trial-epochs") + 1] = "2"
    result = run_cli("nas_kd.search", *args, "--data-dir", str(e2e_copy["data_dir"]), cwd=e2e_copy["work"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: study 'e2e' was created with trial_epochs=1, this run has trial_epochs=2; "
        "use the same settings to resume, or another --study-name")


def test_killed_run_starts_again(e2e_copy: dict) -> None:
    args = list(E2E_ARGS)
    args[args.index("--trials") + 1] = "20"
    cmd = [sys.executable, "-m", "nas_kd.search", *args, "--data-dir", str(e2e_copy["data_dir"])]
    proc = subprocess.Popen(cmd, cwd=e2e_copy["work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = e2e_copy["work"] / "studies" / f"{E2E_STUDY}.db"
    query = "select count(*) from trials where state = 'COMPLETE'"
    done_before = sqlite3.connect(db).execute(query).fetchone()[0]
    deadline = time.time() + 120
    try:
        while time.time() < deadline and sqlite3.connect(db).execute(query).fetchone()[0] == done_before:
            time.sleep(0.5)  # wait for one more trained trial, then kill during the next
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed run of --trials 20 is unfinished: another command leaves it with --more
    result = run_cli("nas_kd.search", *E2E_ARGS, "--final-epochs", "0", "--more", "--data-dir", str(e2e_copy["data_dir"]),
                     cwd=e2e_copy["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    study = load(e2e_copy["url"])
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= done_before + 3


def test_stale_trial_of_a_killed_process_is_retried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url, interval=1)  # stale after 3 s without a heartbeat
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.enqueue_trial({"x": 3})
    dead = study.ask()  # a trial whose process was killed: one heartbeat, then silence
    dead.suggest_int("x", 0, 9)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(5.0)  # SQLite's clock has whole seconds: more than 3 s must show
    seen = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(trial.suggest_int("x", 0, 9))
        trial.set_user_attr("score", 0.5)
        return 0.5

    assert run(study, objective, trained=1, timeout=None) == 1
    assert seen == [3]  # the killed trial's parameters ran again first
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL and states[1] == optuna.trial.TrialState.COMPLETE


def test_workers_opening_a_study_together_propose_different_specs(tmp_path: Path) -> None:
    """Workers started together find the same number of trials; with the run's seed alone their
    samplers proposed the same specs in the same order (the start-up phase trained each once per
    worker). A shared run draws a seed of its own; an unshared one keeps seed + trials found."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=False)
    keys = guarded(SearchConfig(flops_budget=5_000_000), "resnet-v1")

    def first_proposals(shared: bool, name: str) -> list[list[float]]:
        studies = [open_study(storage, name, False, 3, keys, shared=shared) for _ in range(2)]
        trials = [s.ask() for s in studies]
        return [[t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)] for t in trials]

    same = first_proposals(False, "alone")
    assert same[0] == same[1]  # what workers did before: one seed, one proposal
    apart = first_proposals(True, "shared")
    assert apart[0] != apart[1]
    assert sampler_seed(3, 5, shared=False) == 8
    # the runs that share: workers and runs counting the whole study's training
    assert [shares_its_study(SearchConfig(flops_budget=5_000_000, **kw))
            for kw in ({}, {"worker": True}, {"study_trials": 8})] == [False, True, True]


def test_retrain_command_retrains_the_trial_asked_for(e2e_copy: dict) -> None:
    study = load(e2e_copy["url"])
    trained = sorted(t.number for t in study.trials if was_trained(t) and t.state == optuna.trial.TrialState.COMPLETE)
    result = run_cli("nas_kd.retrain", "--study-name", E2E_STUDY, "--trial", str(trained[0]), "--final-epochs", "1",
                     "--final-augment", "on", "--quiet", cwd=e2e_copy["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = load_json(e2e_copy["work"] / "studies" / E2E_STUDY / "winner" / "metrics.json")
    assert metrics["trial"] == trained[0] and metrics["augmented"] is True
    # one epoch: one view, so the teachers run live on it
    assert "for 1 epochs: padding-crop and flips, teachers live on a fresh view every epoch" in result.stderr
    assert load(e2e_copy["url"]).user_attrs["winner"]["trial"] == trained[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--study-name", "nope"], "no storage at sqlite:///studies/nope.db"),
    (["--study-name", E2E_STUDY, "--trial", "999"], "study 'e2e' has no trial 999"),
    (["--study-name", E2E_STUDY, "--final-epochs", "0"], "--final-epochs must be >= 1, got 0"),
    *([(["--study-name", E2E_STUDY, "--device", "cuda"], "--device cuda: no CUDA device is available here")]
      if not torch.cuda.is_available() else []),
])
def test_retrain_command_bad_input(e2e_copy: dict, args: list[str], message: str) -> None:
    result = run_cli("nas_kd.retrain", *args, "--quiet", cwd=e2e_copy["work"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_pareto_objective(e2e_copy: dict) -> None:
    args = list(E2E_ARGS)
    args[args.index("--study-name") + 1] = "pareto"
    result = run_cli("nas_kd.search", *args, "--objective", "pareto", "--final-epochs", "0",
                     "--data-dir", str(e2e_copy["data_dir"]), cwd=e2e_copy["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    study = load(f"sqlite:///{e2e_copy['work'] / 'studies' / 'pareto.db'}", "pareto")
    assert len(study.directions) == 2
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.values == [t.user_attrs["val_acc_curve"][-1][1], float(t.user_attrs["macs"])]
            assert t.intermediate_values == {}  # no pruning in multi-objective studies
    assert (e2e_copy["work"] / "studies" / "pareto" / "report.html").is_file()


def test_search_uses_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's default device is "auto", and "auto" is CUDA exactly when torch sees a GPU:
    both answers of `torch.cuda.is_available` are forced, so this holds on a machine without one."""
    from nas_kd.core.config import SearchConfig
    from nas_kd.core.errors import InputError
    from nas_kd.training.train import resolve_device

    assert SearchConfig().device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device cuda: no CUDA device is available here"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="device must be auto, cpu or cuda, got 'gpu'"):
        resolve_device("gpu")
