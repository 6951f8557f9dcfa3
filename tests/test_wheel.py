"""The wheel carries what nas_kd reads at run time: installed from it, outside the repository, the main
command starts and every shipped search space and teacher is there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
from pathlib import Path
import nas_kd
from nas_kd.nets.space import load_space, shipped_spaces
from nas_kd.teaching.cache import SHIPPED_TEACHERS
assert Path(nas_kd.__file__).is_relative_to(Path(sys.argv[1])), nas_kd.__file__
for name in shipped_spaces():
    print("space", name, load_space(name).size())
print("teachers", *sorted(p.name for p in SHIPPED_TEACHERS.glob("*.safetensors")))
"""


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    # built from a copy of what the wheel is made of: setuptools builds in its source folder, and a
    # stale build/ there would put files in the wheel that the repository no longer has
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "nas_kd", source / "nas_kd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), ".", cwd=source)
    wheel = next((tmp_path / "dist").glob("nas_kd-*.whl"))
    site = tmp_path / "site"
    run(*pip, "install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    assert "--flops-budget" in run(sys.executable, "-m", "nas_kd.search", "--help", cwd=outside, env=env)
    out = run(sys.executable, "-c", CHECK, str(site), cwd=outside, env=env).splitlines()
    spaces = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert spaces, "no search space in search_spaces/"
    assert [line.split()[1] for line in out if line.startswith("space ")] == spaces
    teachers = sorted(p.name for p in (ROOT / "nas_kd" / "shipped").glob("*.safetensors"))
    assert out[-1].split()[1:] == teachers
