"""benchmarks/gpu_check.py, the script a GPU machine runs, in its dry mode on the CPU: so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--no-save", "--train-s", "3",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # the device thread (the GPU's path) and inline give the same labels on the CPU
    assert "agreement: labels equal 1.00000" in out
    for run in ("z, batch 2", "z, batch auto", "y, batch auto", "x, batch auto", "z, float32", "zyx, batch auto"):
        assert f"  {run}: " in out and "Mvoxel/s per axis" in out.split(f"  {run}: ")[1].splitlines()[0], run
    assert "projected 2520 x 2520 x 2120 x 3 axes: {'tasks_s'" in out
    assert not list(tmp_path.iterdir())  # its scratch folder is removed
