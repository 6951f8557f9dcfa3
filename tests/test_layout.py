"""The one-way data flow of the package: a module imports only modules before it (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nas_kd"
# the data flow, first to last (README, Development); command lines come after what they wire
FLOW = ["errors", "versions", "progress", "config", "cli", "data", "batches", "arch", "cost", "records", "proxies", "train", "zoo",
        "teacher_cache", "ensemble", "space", "time_blocks", "convert", "int8", "memory", "blocks", "latency", "budget", "edge", "start", "losses", "distill", "prune", "blockwise",
        "objective", "study", "picks", "plan", "fronts", "report", "export", "online", "baselines", "retrain", "summary", "pipeline", "__init__",
        "export_cli", "latency_cli", "report_cli", "retrain_cli", "teachers", "search", "__main__"]
# the command lines: they parse flags and hand a config to the library, which imports none of them
CLI = {"cli", "search", "teachers", "__main__"} | {p.stem for p in PACKAGE.glob("*_cli.py")}
STANDALONE = {"time_blocks"}  # the device script: its own flags, and nothing of nas_kd (test below)
MAX_LINES = 400  # a module reads in one sitting (STYLE.md)
# known exceptions, each to be removed when its module is split
LONG: dict[str, str] = {}
PARSES_FLAGS: dict[str, str] = {}


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _unguarded(path: Path) -> ast.Module:
    """`path`'s code but what is under `if __name__ == "__main__":`, where a `python -m` entry
    point may hand over to its command line."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    return tree


def nas_kd_imports(path: Path) -> set[str]:
    """Every nas_kd module `path` imports, at the top or inside a function; not under the main guard."""
    found = set()
    for node in ast.walk(_unguarded(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nas_kd":
            if node.module == "nas_kd":
                found |= {a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__" for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nas_kd.")}
    return found


def test_every_module_is_in_the_flow() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(FLOW)


@pytest.mark.parametrize("module", FLOW)
def test_a_module_imports_only_modules_before_it(module: str) -> None:
    later = {m for m in nas_kd_imports(PACKAGE / f"{module}.py") if FLOW.index(m) >= FLOW.index(module)}
    assert not later, f"nas_kd.{module} imports {sorted(later)}, which come after it in the flow"


def test_the_device_script_needs_no_torch_and_no_nas_kd() -> None:
    tree = ast.parse((PACKAGE / "time_blocks.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "argparse", "collections", "json", "os", "platform", "statistics", "sys", "time",
                       "pathlib", "typing", "numpy", "onnxruntime"}  # the standard library of Python 3.8, numpy, ORT


def _marked(modules: list[str], known: dict[str, str]) -> list:
    return [pytest.param(m, marks=pytest.mark.xfail(reason=known[m], strict=False)) if m in known else m
            for m in modules]


@pytest.mark.parametrize("module", _marked([m for m in FLOW if m not in CLI | STANDALONE], PARSES_FLAGS))
def test_a_library_module_parses_no_flags(module: str) -> None:
    """Only the command lines parse flags (STYLE.md): a library module imports neither argparse
    nor a command-line module, but under its main guard."""
    tree = _unguarded(PACKAGE / f"{module}.py")
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "argparse" not in roots, f"nas_kd.{module} imports argparse: its command line belongs in a *_cli module"
    cli = nas_kd_imports(PACKAGE / f"{module}.py") & CLI
    assert not cli, f"nas_kd.{module} imports the command-line module(s) {sorted(cli)}"


@pytest.mark.parametrize("module", _marked(FLOW, LONG))
def test_a_module_reads_in_one_sitting(module: str) -> None:
    lines = len((PACKAGE / f"{module}.py").read_text().splitlines())
    assert lines <= MAX_LINES, f"nas_kd/{module}.py has {lines} lines, over {MAX_LINES}: split it along its sections"
