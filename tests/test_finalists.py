"""--finalists K: the best K trials by trial score, each retrained with the full schedule; the one of
best validation accuracy is the winner, and only it is tested and exported
(`nas_kd.nas.study.finalists`, `nas_kd.retraining.retrain.retrain_winner`, both commands)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import E2E_STUDY, load_json

from nas_kd import retrain as retrain_cli
from nas_kd import search
from nas_kd.core.config import DistillConfig, SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.distill import student as distill
from nas_kd.nas.picks import finalists, pick_winner, retrain_candidates
from nas_kd.nas.records import START_ATTR
from nas_kd.nas.start import HAND_MADE
from nas_kd.nas.study import WINNER_ATTR
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.pipeline import run as pipeline
from nas_kd.reporting.html import write_report
from nas_kd.retraining import retrain
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import CachedTargets, Ensemble

A, B, C, D = "c8|basic_d1_w8_s2_k3_e1", "c8|basic_d1_w16_s2_k3_e1", "c8|basic_d1_w24_s2_k3_e1", "c8|basic_d1_w32_s2_k3_e1"


def add(study: optuna.Study, spec: str, value: float, macs: int, over: bool = False, trained: bool = True,
        start: str | None = None) -> int:
    """A completed trial of `spec` scored `value`; over budget when `over`; a repeat that reused a
    stored score (not trained) unless `trained`; a start point (nas_kd.nas.start) named `start`."""
    study.add_trial(optuna.trial.create_trial(value=value, constraints={"macs": 0.5 if over else -0.5}, user_attrs={
        "spec": spec, "macs": macs, "params": 1, **({"val_acc_per_epoch": [value]} if trained else {}),
        **({START_ATTR: start} if start else {})}))
    return len(study.trials) - 1


def test_finalists_are_the_best_distinct_feasible_trials() -> None:
    study = optuna.create_study(direction="maximize")
    a = add(study, A, 0.70, 10)
    b = add(study, B, 0.80, 20)
    c = add(study, C, 0.80, 15)  # B's score with fewer MACs: ahead of B
    add(study, D, 0.95, 5, over=True)  # the best score, over budget: never a finalist
    add(study, C, 0.99, 15, trained=False)  # a repeat that trained nothing: not a trial of its own
    a2 = add(study, A, 0.75, 10)  # A trained again, scoring higher: A's finalist is this trial
    assert [t.number for t in finalists(study, 3)] == [c, b, a2]
    assert [t.number for t in finalists(study, 10)] == [c, b, a2]  # no more distinct feasible students
    assert [t.number for t in finalists(study, 1)] == [pick_winner(study).number] == [c]
    assert a not in [t.number for t in finalists(study, 3)]


def test_start_points_are_retrained_whatever_their_score() -> None:
    study = optuna.create_study(direction="maximize")
    made = add(study, A, 0.60, 10, start=HAND_MADE)  # scored last of the feasible trials
    b = add(study, B, 0.80, 20)
    c = add(study, C, 0.70, 15)
    add(study, D, 0.50, 5, over=True, start="given")  # over budget: never retrained
    assert [t.number for t in retrain_candidates(study, 1)] == [b, made]
    assert [t.number for t in retrain_candidates(study, 2)] == [b, c, made]
    assert [t.number for t in retrain_candidates(study, 3)] == [b, c, made]  # a finalist already: once
    assert [t.number for t in retrain_candidates(study, 0)] == [made]


def test_finalists_of_a_study_without_feasible_trials_is_input_error() -> None:
    study = optuna.create_study(direction="maximize")
    add(study, D, 0.9, 5, over=True)
    with pytest.raises(InputError, match="has no completed trial within the budget yet"):
        finalists(study, 2)


@pytest.fixture
def tiny_ensemble(mini_dataset) -> Ensemble:
    """One untrained small teacher: the loss needs its outputs, not its accuracy."""
    torch.manual_seed(0)
    model = build(Spec.parse("c8|basic_d1_w16_s2_k3_e1"), mini_dataset.input_shape, mini_dataset.num_classes)
    return Ensemble([Teacher("tiny", model, count(model, mini_dataset.input_shape), 0.5, "test")])


def test_retrain_winner_keeps_the_finalist_of_best_validation_and_tests_only_it(
        mini_dataset, tiny_ensemble: Ensemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = optuna.create_study(study_name="tiny", direction="maximize")
    for spec, score in ((A, 0.5), (B, 0.6), (C, 0.4)):
        macs = count(build(Spec.parse(spec), mini_dataset.input_shape, mini_dataset.num_classes),
                     mini_dataset.input_shape).macs
        add(study, spec, score, macs)
    # the validation accuracies after the retrain, set here: the second finalist is the better one
    val = {B: 0.30, A: 0.60}
    monkeypatch.setattr(retrain, "evaluate", lambda model, split, dataset: val[str(model.spec)])
    tested: list[str] = []

    def test_metrics(model, dataset, ensemble) -> dict[str, Any]:
        tested.append(str(model.spec))
        return original(model, dataset, ensemble)
    original = retrain.test_metrics
    monkeypatch.setattr(retrain, "test_metrics", test_metrics)
    made: list[int] = []

    class Counted(CachedTargets):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(distill, "CachedTargets", Counted)
    lines: list[str] = []
    cfg = SearchConfig(final_epochs=1, finalists=2, onnx=False, seed=1,
                       distill=DistillConfig(losses=(("ce", 1.0), ("kl", 1.0))))
    metrics = retrain.retrain_winner(study, mini_dataset, tiny_ensemble, cfg, tmp_path / "winner", False, lines.append)

    rows = metrics["finalists"]  # C is third by score: not a finalist
    assert [(r["trial"], r["spec"], r["search_val_acc"], r["val_acc"]) for r in rows] == [(1, B, 0.6, 0.30),
                                                                                          (0, A, 0.5, 0.60)]
    assert (metrics["trial"], metrics["spec"], metrics["search_val_acc"]) == (0, A, 0.5)  # validation, not score
    assert tested == [A]  # the test set saw the kept finalist only
    assert len(made) == 1  # the teachers' outputs were computed once for both finalists
    assert load_json(tmp_path / "winner" / "metrics.json")["finalists"] == rows == study.user_attrs[WINNER_ATTR]["finalists"]
    assert lines[0] == f"retraining finalist 1 of 2: trial 1 ({B}) for 1 epochs: no augmentation"
    assert "finalist 2: trial 0 val acc 0.6000 after the retrain (trial score 0.5)" in lines
    assert "finalists: trial 0 has the best validation accuracy (0.6000); testing it" in lines
    html, _ = write_report(study, tmp_path)
    assert "<h3>Finalists</h3>" in html.read_text()

    # a tie on validation goes to the better trial score
    val[A] = 0.30
    tie = retrain.retrain_winner(study, mini_dataset, tiny_ensemble, cfg, tmp_path / "tie", False, lambda _: None)
    assert tie["trial"] == 1

    # the default, one finalist: the best trial, tested, no finalists recorded
    tested.clear()
    one = retrain.retrain_winner(study, mini_dataset, tiny_ensemble, SearchConfig(
        final_epochs=1, onnx=False, seed=1, distill=cfg.distill), tmp_path / "one", False, lambda _: None)
    assert one["trial"] == 1 and "finalists" not in one and tested == [B]
    assert "<h3>Finalists</h3>" not in write_report(study, tmp_path)[0].read_text()

    # a start point scored below every trial is retrained beside the best one, and kept when it is
    # better on validation
    macs = count(build(Spec.parse(D), mini_dataset.input_shape, mini_dataset.num_classes), mini_dataset.input_shape).macs
    add(study, D, 0.1, macs, start=HAND_MADE)
    val.update({B: 0.30, D: 0.70})
    lines.clear()
    kept = retrain.retrain_winner(study, mini_dataset, tiny_ensemble, SearchConfig(
        final_epochs=1, onnx=False, seed=1, distill=cfg.distill), tmp_path / "start", False, lines.append)
    assert [(r["trial"], r.get("start_point")) for r in kept["finalists"]] == [(1, None), (3, HAND_MADE)]
    assert kept["trial"] == 3 and kept["spec"] == D
    assert lines[0] == ("start points, retrained whatever their trial score and kept only if best on validation: "
                        "trial 3 (hand-made, trial score 0.1)")
    assert f"retraining finalist 2 of 2 (hand-made start point): trial 3 ({D}) for 1 epochs: no augmentation" in lines
    finalists_html = write_report(study, tmp_path)[0].read_text().split("<h3>Finalists</h3>")[1].split("</table>")[0]
    assert "<td>hand-made</td>" in finalists_html and "the study's start points" in finalists_html


def test_retrain_command_with_finalists(e2e_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(e2e_run["db"], db)  # the session's study stays as other tests read it
    url, out = f"sqlite:///{db}", tmp_path / "out"
    expected = [t.number for t in finalists(optuna.load_study(study_name=E2E_STUDY, storage=url), 2)]
    monkeypatch.chdir(e2e_run["work"])  # the search's teacher cache
    assert retrain_cli.main(["--study-name", E2E_STUDY, "--storage", url, "--out-dir", str(out), "--finalists", "2",
                         "--final-epochs", "1", "--no-onnx", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"retraining finalist 1 of 2: trial {expected[0]} (" in err
    assert f"retraining finalist 2 of 2: trial {expected[1]} (" in err
    metrics = load_json(out / E2E_STUDY / "winner" / "metrics.json")
    assert [r["trial"] for r in metrics["finalists"]] == expected
    assert metrics["trial"] == max(metrics["finalists"], key=lambda r: r["val_acc"])["trial"]
    assert "<h3>Finalists</h3>" in (out / E2E_STUDY / "report.html").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--finalists", "0"], "--finalists must be >= 1, got 0"),
    (["--finalists", "2", "--trial", "0"], "--finalists 2 picks the winner by retraining the best 2; it does not go "
                                           "with --trial"),
    (["--finalists", "2", "--online-ensemble", "2"], "--finalists 2 picks the winner by retraining the best 2; it "
                                                     "does not go with --online-ensemble"),
])
def test_retrain_command_bad_finalists(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # checked before the study is opened: no storage needed
    assert retrain_cli.main(["--study-name", E2E_STUDY, *argv, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


@pytest.mark.parametrize(("argv", "message"), [
    (["--finalists", "0"], "argument --finalists: must be >= 1, got '0'"),
    (["--finalists", "2", "--retrain-trial", "1"], "--retrain-trial picks one trial and --finalists 2 the best 2; "
                                                   "give one of them"),
])
def test_search_command_bad_finalists(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        code = search.main(["--flops-budget", "50M", *argv, "--quiet"])
        raise SystemExit(code)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "studies").exists()  # nothing written


def test_python_api_checks_finalists(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="finalists must be >= 1, got 0"):
        pipeline.search(SearchConfig(flops_budget=50_000_000, finalists=0, out_dir=str(tmp_path)))
