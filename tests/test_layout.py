"""The house by role: the commands at the top of `nas_kd`, the library in subpackages below them,
every import running down (a module imports only its own subpackage's modules, without a circle,
and subpackages below its own), and no module over one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nas_kd"
# the subpackages, lowest first: each may import only itself and those before it
LAYERS = ["core", "data", "nets", "training", "teaching", "device", "distill", "nas", "reporting", "retraining",
          "pipeline"]
# the top: the commands users type (`python -m nas_kd.<command>`, `nas-kd <command>`), their shared flag
# plumbing (`cli`) and the Python API (`__init__`); nothing below imports them
COMMANDS = {"search", "retrain", "report", "export", "latency", "teachers"}
TOP = COMMANDS | {"cli", "__main__", "__init__"}
STANDALONE = "device.time_blocks"  # the script a device runs: its own flags, and nothing of nas_kd
MAX_LINES = 400  # a module reads in one sitting


def modules() -> list[str]:
    """Every module of the package, as its dotted name under nas_kd (`nas.objective`, `search`)."""
    found = [p.stem for p in PACKAGE.glob("*.py")]
    for layer in LAYERS:
        found += [f"{layer}.{p.stem}" for p in (PACKAGE / layer).glob("*.py")]
    return sorted(found)


def path_of(module: str) -> Path:
    return PACKAGE / (module.replace(".", "/") + ".py")


def imports(module: str) -> set[str]:
    """Every nas_kd module or subpackage `module` imports, at the top or inside a function, as a dotted
    name under nas_kd (`from nas_kd.nets import arch` gives `nets.arch`; `import nas_kd` gives `__init__`)."""
    found = set()
    for node in ast.walk(ast.parse(path_of(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nas_kd":
            inner = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:
                name = f"{inner}.{alias.name}".strip(".")
                found.add(name if path_of(name).exists() else (inner or "__init__"))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] if "." in a.name else "__init__" for a in node.names
                      if a.name.split(".")[0] == "nas_kd"}
    return found


def layer_of(module: str) -> str:
    """The subpackage a module belongs to, or "top"."""
    return module.split(".")[0] if "." in module or module in LAYERS else "top"


def test_every_subpackage_is_a_layer_and_says_what_it_holds() -> None:
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == sorted(LAYERS)
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 6, f"nas_kd/{layer}/__init__.py: say in a few lines what it holds"
        held = {p.stem for p in (PACKAGE / layer).glob("*.py")} - {"__init__"}
        named = {name for name in held if f"`{name}`" in doc}
        assert named == held, f"nas_kd/{layer}/__init__.py does not name {sorted(held - named)}"


def test_the_top_holds_only_the_commands_and_the_api() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP


@pytest.mark.parametrize("module", modules())
def test_imports_run_down(module: str) -> None:
    """A library module imports only modules of its own subpackage or of subpackages below it, never
    the top; the top imports anything below."""
    own = layer_of(module)
    if own == "top":
        return
    for name in imports(module):
        other = layer_of(name)
        assert other != "top", f"nas_kd.{module} imports nas_kd.{name}, a command or the API above the library"
        assert LAYERS.index(other) <= LAYERS.index(own), (
            f"nas_kd.{module} imports nas_kd.{name}: {other} is above {own} (order: {', '.join(LAYERS)})")


@pytest.mark.parametrize("layer", LAYERS)
def test_no_circle_inside_a_subpackage(layer: str) -> None:
    graph = {m: {n for n in imports(m) if n.startswith(layer + ".") and n != m}
             for m in modules() if m.startswith(layer + ".")}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "circle: " + " -> ".join(path[path.index(node):] + [node])
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        done.add(node)

    for start in graph:
        visit(start, [])


def test_the_layout_checks_can_fail() -> None:
    """The checks above read real imports: a module of `core` importing `nas` would be caught."""
    assert "core.errors" in imports("nets.arch")
    assert layer_of("nas.objective") == "nas" and LAYERS.index("nas") > LAYERS.index("core")
    assert "pipeline.run" in imports("__init__") and "nas.objective" not in imports("core.config")


@pytest.mark.parametrize("module", [m for m in modules() if layer_of(m) != "top" and m != STANDALONE])
def test_a_library_module_parses_no_flags_and_runs_nothing(module: str) -> None:
    """Only the commands parse flags: a library module imports no argparse and has no `__main__` guard."""
    tree = ast.parse(path_of(module).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "argparse" not in roots, f"nas_kd.{module} imports argparse: flags belong to a command at the top"
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__name__" in ast.unparse(n.test)]
    assert not guards, f"nas_kd.{module} has a __main__ guard: a library module runs nothing"


def test_the_device_script_needs_no_torch_and_no_nas_kd() -> None:
    tree = ast.parse(path_of(STANDALONE).read_text())
    used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert used <= {"__future__", "argparse", "collections", "json", "os", "platform", "statistics", "sys", "time",
                    "pathlib", "typing", "numpy", "onnxruntime"}  # the standard library of Python 3.8, numpy, ORT


@pytest.mark.parametrize("module", modules())
def test_a_module_reads_in_one_sitting(module: str) -> None:
    lines = len(path_of(module).read_text().splitlines())
    assert lines <= MAX_LINES, f"nas_kd/{module.replace('.', '/')}.py has {lines} lines, over {MAX_LINES}: split it"
