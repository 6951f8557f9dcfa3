"""Bad input on the command line: one line on stderr naming what was wrong, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from nas_kd import search
from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.nas.budget import Budget, budget_warning
from nas_kd.pipeline import run as pipeline
from tests.conftest import run_cli


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = search.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--flops-budget", "-5M"], "argument --flops-budget: --flops-budget '-5M' is not a positive count"),
    (["--flops-budget", "abc"], "'abc' is not a positive count; use a number with an optional K/M/G suffix"),
    (["--flops-budget", "50MB"], "'50MB' is not a positive count"),
    (["--flops-budget", "0"], "'0' is not a positive count"),
    (["--params-budget", "1.5X"], "--params-budget '1.5X' is not a positive count"),
    ([], "give a budget: --flops-budget (MACs, e.g. 50M), --params-budget (e.g. 500K), --latency-budget (e.g. 2ms)"),
    (["--latency-budget", "2"], "--latency-budget '2' is not a positive time with a unit; use a number with us or ms"),
    (["--latency-budget", "2s"], "--latency-budget '2s' is not a positive time with a unit"),
    (["--latency-budget", "-1ms"], "--latency-budget '-1ms' is not a positive time"),
    (["--latency-budget", "0us"], "--latency-budget '0us' is not a positive time"),
    (["--memory-budget", "0"], "--memory-budget '0' is not a positive number of bytes"),
    (["--memory-budget", "lots"], "use a number with an optional K/M/G (decimal) or KiB/MiB/GiB (binary) suffix"),
    (["--flops-budget", "50M", "--latency-precision", "int4"], "argument --latency-precision: invalid choice: 'int4'"),
    (["--flops-budget", "50M", "--latency-threads", "0"], "argument --latency-threads: must be >= 1, got '0'"),
    (["--flops-budget", "50M", "--pareto-cost", "energy"], "argument --pareto-cost: invalid choice: 'energy'"),
    (["--flops-budget", "50M", "--latency-table", "missing.json"], "cannot read latency table missing.json"),
    (["--memory-budget", "1K"], "no student of search space 'resnet' meets --memory-budget 1KB: its lowest peak int8 activation memory "
                                   "is 7.056KB, by c4|bottleneck_d1_w4_s1_k3_e4|basic_d1_w4_s2_k3_e1|basic_d1_w4_s2_k3_e1"),
    (["--memory-budget", "1K", "--search-space", "resnet-v1"],
     "no student of search space 'resnet-v1' meets --memory-budget 1KB: its lowest peak int8 activation memory "
     "is 28.22KB, by c16|bottleneck_d1_w16_s1_k3_e4|basic_d1_w32_s2_k3_e1|basic_d1_w128_s2"),
    (["--latency-budget", "1us"], "no student of search space 'resnet' meets --latency-budget 0.001 ms: the lowest"),
    (["--flops-budget", "50M", "--trials", "x"], "argument --trials: expected an integer, got 'x'"),
    (["--flops-budget", "50M", "--trial-epochs", "0"], "argument --trial-epochs: must be >= 1, got '0'"),
    (["--flops-budget", "50M", "--objective", "speed"], "argument --objective: invalid choice: 'speed'"),
    (["--flops-budget", "50M", "--teachers", "resnet19"], "unknown teacher 'resnet19'; known: resnet8"),
    (["--flops-budget", "50M", "--teachers", "resnet8,resnet8"], "lists a teacher twice"),
    (["--flops-budget", "50M", "--teacher-ckpt", "resnet8"], "expected ARCH=PATH"),
    (["--flops-budget", "50M", "--distill", "kl=abc"], "--distill: weight of 'kl' must be a number, got 'abc'"),
    (["--flops-budget", "50M", "--distill", "kl,mystery"], "unknown distillation loss 'mystery'; known: ce, kl, hint, crosslayer, at, rtk"),
    (["--flops-budget", "50M", "--distill", "ce=0"], "every loss of the recipe has weight 0"),
    (["--flops-budget", "50M", "--dataset", "imagenet"], "unknown dataset 'imagenet'; known: fashion-mnist, mnist"),
    (["--flops-budget", "50M", "--search-space", "tiny"], "unknown search space 'tiny'; shipped: mobilenetv2, resnet, resnet-v1"),
    (["--flops-budget", "10K"], "no student of search space 'resnet' fits MACs <= 10K: the smallest reach 52.63K MACs"),
    (["--params-budget", "100"], "the smallest reach 52.63K MACs (c4|bottleneck_d1_w4_s1_k3_e4"),
    (["--flops-budget", "100K", "--search-space", "resnet-v1"],
     "no student of search space 'resnet-v1' fits MACs <= 100K: the smallest reach 1.054M MACs"),
    (["--params-budget", "5K", "--search-space", "resnet-v1"], "the smallest reach 1.054M MACs (c16|bottleneck_d1_w16_s1_k3_e4"),
    (["--flops-budget", "50M", "--storage", "mysql://u@h/db"], "storage URL 'mysql://u@h/db' uses 'mysql'; supported: sqlite"),
    (["--flops-budget", "50M", "--storage", "not a url"], "bad storage URL 'not a url'"),
    (["--flops-budget", "50M", "--config", "missing.yaml"], "cannot read --config missing.yaml"),
    (["--flops-budget", "50M", "--two-stage", "1.5"], "argument --two-stage: expected a fraction in [0, 1), got '1.5'"),
    (["--flops-budget", "50M", "--two-stage", "0.5", "--distill", "ce,kl"],
     "--two-stage needs a feature loss (hint, crosslayer, at, rtk) for stage one"),
    (["--flops-budget", "50M", "--two-stage", "0.5", "--distill", "crosslayer"], "and a logit loss (ce, kl) for stage two"),
    (["--flops-budget", "50M", "--ensemble-weighting", "best"], "argument --ensemble-weighting: invalid choice: 'best'"),
    (["--flops-budget", "50M", "--trial-score", "zero-cost"], "argument --trial-score: invalid choice: 'zero-cost'"),
    (["--flops-budget", "50M", "--int8-target", "x86-sse"], "argument --int8-target: invalid choice: 'x86-sse'"),
    (["--flops-budget", "5M", "--pruned-baseline", "--teachers", "resnet8,resnet110"],
     "--pruned-baseline: the largest teacher resnet110 pruned to one filter per prunable layer still has"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # a latency budget is checked against the smallest specs and 8 random ones, each exported and
    # timed (2-3 s a spec); one random spec says the same here
    monkeypatch.setattr("nas_kd.nas.budget.LATENCY_PROBES", 1)
    code, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not (tmp_path / "studies" / "cache").exists()  # nothing was trained


@pytest.mark.parametrize(("content", "message"), [
    ("trials: many\n", "trials: expected int, got 'many'"),
    ("colour: blue\n", "unknown config key 'colour'"),
    ("train: {lr: fast}\n", "train.lr: expected float, got 'fast'"),
    ("[1, 2\n", "not valid YAML"),
])
def test_bad_config_yaml(content: str, message: str, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(content)
    code, err = run_main(["--flops-budget", "50M", "--config", "c.yaml"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_bad_search_space_yaml_names_file_and_key(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("stem: 16\nstages:\n  - {block: basic, depth: 1, widht: 16}\n")
    code, err = run_main(["--flops-budget", "50M", "--search-space", "s.yaml"], capsys)
    assert code == 2
    assert err.strip() == "error: s.yaml: stages[0].widht: unknown key; known: block, depth, width, stride, kernel, expand, se"


def test_config_yaml_is_overridden_by_typed_flags(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("trials: 7\nseed: 4\ndistill: {temperature: 2.0}\n")
    argv = ["--flops-budget", "5M", "--config", str(tmp_path / "c.yaml"), "--seed", "9"]
    cfg = search.config_from_args(search.build_parser().parse_args(argv), search.given_flags(argv))
    assert (cfg.trials, cfg.seed, cfg.distill.temperature, cfg.flops_budget) == (7, 9, 2.0, 5_000_000)
    assert cfg.distill.losses == (("ce", 1.0), ("kl", 1.0), ("hint", 1.0))


def config_of(argv: list[str]) -> SearchConfig:
    return search.config_from_args(search.build_parser().parse_args(argv), search.given_flags(argv))


def test_the_bare_command_runs_for_the_default_time_budget_and_counts_replace_it(tmp_path: Path) -> None:
    from nas_kd.core.config import DEFAULT_TIME_BUDGET
    bare = config_of(["--flops-budget", "50M"])
    assert (bare.time_budget, bare.time_fixed) == (DEFAULT_TIME_BUDGET, ())
    for counts in (["--trials", "4"], ["--final-epochs", "2"], ["--timeout", "60"], ["--study-trials", "8"],
                   ["--worker"], ["--time-budget", "off"]):
        cfg = config_of(["--flops-budget", "50M", *counts])
        assert cfg.time_budget is None, counts
    assert config_of(["--flops-budget", "50M", "--trials", "4"]).trials == 4
    (tmp_path / "c.yaml").write_text("final_epochs: 5\n")  # a count in a config file counts too
    assert config_of(["--flops-budget", "50M", "--config", str(tmp_path / "c.yaml")]).time_budget is None
    (tmp_path / "t.yaml").write_text("seed: 2\n")
    assert config_of(["--flops-budget", "50M", "--config", str(tmp_path / "t.yaml")]).time_budget == DEFAULT_TIME_BUDGET
    (tmp_path / "n.yaml").write_text("timeout: null\nworker: false\n")  # counts that count nothing
    assert config_of(["--flops-budget", "50M", "--config", str(tmp_path / "n.yaml")]).time_budget == DEFAULT_TIME_BUDGET
    (tmp_path / "off.yaml").write_text("time_budget: null\n")  # a config file's way to say off
    assert config_of(["--flops-budget", "50M", "--config", str(tmp_path / "off.yaml")]).time_budget is None
    given = config_of(["--flops-budget", "50M", "--time-budget", "10m", "--trials", "3", "--search-share", "0.4"])
    assert (given.time_budget, given.time_fixed, given.search_share) == (600.0, ("trials",), 0.4)


@pytest.mark.parametrize("counts", [["--trials", "3"], ["--time-budget", "off"]])
def test_a_search_share_without_a_time_budget_is_refused(counts: list[str], capsys) -> None:
    code, err = run_main(["--flops-budget", "50M", *counts, "--search-share", "0.2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--search-share splits a time budget" in err and "give --time-budget too" in err


@pytest.mark.parametrize("share", ["0", "1", "1.5", "x"])
def test_a_bad_search_share_is_refused(share: str, capsys) -> None:
    code, err = run_main(["--flops-budget", "50M", "--search-share", share], capsys)
    assert code == 2
    assert f"--search-share: expected a fraction between 0 and 1 (exclusive), got '{share}'" in err


@pytest.mark.parametrize("argv", [["--flops-budget", "50MB"], ["--flops-budget", "50M", "--dataset", "nope"]])
def test_real_process_prints_no_traceback(argv: list[str], tmp_path: Path) -> None:
    result = run_cli("nas_kd.search", *argv, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_help_explains_macs() -> None:
    text = search.build_parser().format_help()
    for phrase in ("MACs", "ptflops", "FLOPs", "50M = 50e6", "optuna-dashboard", "--teacher-ckpt"):
        assert phrase in text


def test_python_api_validates_too(tmp_path: Path, monkeypatch) -> None:
    from nas_kd.core.config import SearchConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="give a budget"):
        pipeline.search(SearchConfig())
    with pytest.raises(InputError, match="unknown teacher 'resnet19'"):
        pipeline.search(SearchConfig(flops_budget=10**7, teachers=("resnet19",)))
    assert not (tmp_path / "studies").exists()


TAIL = "): those would not compress it; lower the budget or use larger --teachers"


@pytest.mark.parametrize(("budget", "teachers", "expected"), [
    (Budget(macs=5_000_000), ["resnet8"], None),
    (Budget(macs=10_000_000, params=50_000), ["resnet8"],
     "warning: the budget admits students larger than the largest teacher (10M MACs > teacher resnet8's 9.346M" + TAIL),
    (Budget(macs=50_000_000, params=500_000), ["resnet8", "resnet14"],
     "warning: the budget admits students larger than the largest teacher (50M MACs > teacher resnet14's 20.18M; "
     "500K params > teacher resnet14's 175K" + TAIL),
])
def test_budget_warning_names_both_costs(budget: Budget, teachers: list[str], expected: str | None) -> None:
    assert budget_warning(budget, teachers, (1, 28, 28), 10) == expected


def test_the_default_budget_is_below_the_default_teachers() -> None:
    """The point of the default teachers: every student the default budget admits compresses them."""
    assert budget_warning(Budget(macs=50_000_000), list(SearchConfig().teachers), (1, 28, 28), 10) is None


def test_one_command_runs_every_command(capsys) -> None:
    """`python -m nas_kd <command>` and the console script `nas-kd` (pyproject's [project.scripts])
    run each command's own main; --help lists them; an unknown one is one line and exit 2."""
    import importlib

    import tomllib

    from nas_kd.__main__ import COMMANDS
    from nas_kd.__main__ import main as nas_kd_main

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["nas-kd"].partition(":")
    assert getattr(importlib.import_module(module), func) is nas_kd_main
    assert nas_kd_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS)
    for name, (target, _) in COMMANDS.items():
        assert callable(importlib.import_module(target).main), name
    assert nas_kd_main(["bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown command 'bogus'; known: search, retrain, report, export, latency, teachers "
                   "(nas-kd --help)"]
    with pytest.raises(SystemExit) as exited:  # the command's own parser, its own exit status
        nas_kd_main(["export", "--int8-target", "z80"])
    assert exited.value.code == 2
