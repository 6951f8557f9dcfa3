"""The one-way data flow of the package: a module imports only modules before it (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nas_kd"
# the data flow, first to last (README, Development); command lines come after what they wire
FLOW = ["errors", "__init__", "config", "cli", "data", "arch", "cost", "records", "proxies", "train", "teachers", "teacher_cli",
        "space", "time_blocks", "latency", "start", "losses", "distill", "prune", "blockwise", "objective", "study",
        "report", "export", "online", "baselines", "retrain", "search"]


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def nas_kd_imports(path: Path) -> set[str]:
    """Every nas_kd module `path` imports, at the top or inside a function; not under
    `if __name__ == "__main__":`, where a `python -m` entry point may hand over to its command line."""
    found = set()
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    for node in ast.walk(tree):
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
