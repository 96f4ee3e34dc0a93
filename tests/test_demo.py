"""The README's main job, `epreuve demo`, as a fresh user runs it (its own data directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker


def test_demo_evaluates_a_whole_challenge(tmp_path, docker_engine):
    env = {**os.environ, "EPREUVE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    proc = subprocess.run([str(Path(sys.executable).parent / "epreuve"), "demo"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "challenge demo-liver created" in out
    for team in ("monai-unet", "threshold", "threshold-no-smoothing"):
        assert f"│ {team} " in out  # ranked on the leaderboard
    assert "broken (#4): NONZERO_EXIT" in out
    assert "weights.pt" in out  # the broken image's own error, from its log


def test_sandbox_demo(docker_engine):
    proc = subprocess.run([str(Path(sys.executable).parent / "epreuve"), "demo", "--sandbox"],
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    for reason in ("OOM_KILLED", "TIMEOUT", "OUTPUT_QUOTA", "IMAGE_INVALID"):
        assert reason in proc.stdout
