"""The wheel ships passes/ and backends/ as graphopt.passes / graphopt.backends."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_imports_without_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = wheels.glob("graphopt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"graphopt/__init__.py", "graphopt/hookspecs.py", "graphopt/passes/__init__.py",
            "graphopt/passes/constant_folding.py", "graphopt/backends/cpu.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "graphopt = graphopt._cli:main" in (tmp_path / "site" / entry_points).read_text()
    code = (
        "import graphopt, graphopt.passes, graphopt.backends\n"
        "print(graphopt.__file__); print(graphopt.passes.__file__); print(graphopt.backends.__file__)\n"
        "reg = graphopt.get_registry(); print(sorted(reg.passes)); print(sorted(reg.backends))\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "GRAPHOPT_DISABLE_PLUGINS": "all"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    site = str(tmp_path / "site")
    assert all(line.startswith(site) for line in lines[:3]), lines
    assert "dead-code-elimination" in lines[3] and "'cpu'" in lines[4]
