"""The README's main job, run as a test so the example never rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "qwen2-dynamo-sdpa-decode.onnx"


def test_readme_main_job(tmp_path):
    out = tmp_path / "qwen2-opt.onnx"
    steps = [
        [sys.executable, "-m", "graphopt", "optimize", str(FIXTURE), "-o", str(out), "--target", "cpu",
         "--report", str(tmp_path / "report.json")],
        [sys.executable, "-m", "graphopt", "inspect", str(out)],
        [sys.executable, str(ROOT / "examples" / "check_against_torch.py"), str(out), str(FIXTURE.with_suffix(".npz"))],
    ]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    assert "OK: worst" in res.stdout
    readme = (ROOT / "README.md").read_text()
    assert "examples/check_against_torch.py" in readme and "tests/fixtures/qwen2-dynamo-sdpa-decode.onnx" in readme
