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
    # the trained UNet beats the thresholds on the lesions; smoothing beats none
    assert table_rows(out, columns=3) == [["1", "monai-unet", "3"], ["2", "threshold", "1"],
                                          ["3", "threshold-no-smoothing", "2"]]
    assert "broken (#4): NONZERO_EXIT" in out
    assert "weights.pt" in out  # the broken image's own error, from its log
    reviewers_reproduce_the_winner(tmp_path, env, winner="3")


def reviewers_reproduce_the_winner(tmp_path: Path, env: dict, winner: str) -> None:
    """The README's reviewers' path: the winner's bundle and the released data on a fresh
    data directory (no database, no server) reproduce it, case by case, identically."""
    epreuve = str(Path(sys.executable).parent / "epreuve")
    bundle, archive = tmp_path / "winner.tar", tmp_path / "validation.tar.gz"
    for command in (["export", winner, "--to", str(bundle)],
                    ["dataset", "release", str(tmp_path / "data/demo/data/demo-liver/validation"),
                     "--to", str(archive)]):
        proc = subprocess.run([epreuve, *command], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    fresh = tmp_path / "reviewer"
    (fresh / "data").mkdir(parents=True)
    subprocess.run(["tar", "xzf", str(archive), "-C", str(fresh / "data")], check=True)
    proc = subprocess.run([epreuve, "reproduce", str(bundle), "--data", str(fresh / "data")],
                          env={**env, "EPREUVE_DATA_DIR": str(fresh / "state")},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: identical" in proc.stdout
    assert not (fresh / "state" / "epreuve.db").exists()


def table_rows(output: str, columns: int) -> list[list[str]]:
    """The first `columns` cells of each body row of the tables rich printed."""
    return [[cell.strip() for cell in line.split("│")[1:columns + 1]]
            for line in output.splitlines() if line.startswith("│")]


def test_sandbox_demo(docker_engine):
    proc = subprocess.run([str(Path(sys.executable).parent / "epreuve"), "demo", "--sandbox"],
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert table_rows(proc.stdout, columns=3) == [
        ["well-behaved algorithm", "succeeded", "-"],
        ["memory hog, 128 MiB limit", "failed", "OOM_KILLED"],
        ["ignores SIGTERM, 2 s limit", "failed", "TIMEOUT"],
        ["fills /output, 8 MiB quota", "failed", "OUTPUT_QUOTA"],
        ["fork bomb, 64 processes, 3 s", "failed", "TIMEOUT"],
        ["floods 64 MiB of log", "succeeded", "-"],
        ["image that is not on the node", "failed", "IMAGE_INVALID"],
    ]
    assert "64.0 MiB (capped)" in proc.stdout
