"""`epreuve dataset ...` as an organiser types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EPREUVE = str(Path(sys.executable).parent / "epreuve")


def epreuve(*args: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EPREUVE_STATE_DIR": str(state), "COLUMNS": "200"}
    return subprocess.run([EPREUVE, "dataset", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_synth_seal_verify_tamper_release(tmp_path):
    state, root = tmp_path / "state", tmp_path / "ds"
    assert epreuve("synth", str(root), "--cases", "3", "--size", "24", "--seed", "4",
                   state=state).returncode == 0
    sealed = epreuve("seal", str(root), state=state)
    assert sealed.returncode == 0 and "sealed 3 cases; version" in sealed.stdout
    assert "full check" in epreuve("verify", str(root), state=state).stdout
    assert "quick check, 0 files hashed" in epreuve("verify", str(root), state=state).stdout

    archive = tmp_path / "open.tar.gz"
    assert epreuve("release", str(root), "--to", str(archive), state=state).returncode == 0
    assert epreuve("verify", str(archive), state=state).returncode == 0

    target = root / "ground_truth/case-002/label.nii.gz"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    tampered = epreuve("verify", str(root), "--format", "tsv", state=state)
    assert tampered.returncode == 1
    assert "changed\tground_truth/case-002/label.nii.gz\n" in tampered.stdout
    refused = epreuve("release", str(root), "--to", str(tmp_path / "x.tar.gz"), state=state)
    assert refused.returncode == 1 and "no longer matches its seal" in refused.stderr


def test_seal_names_the_case_without_ground_truth(tmp_path):
    root = tmp_path / "ds"
    epreuve("synth", str(root), "--cases", "2", "--size", "20", state=tmp_path)
    (root / "ground_truth/case-001/label.nii.gz").unlink()
    proc = epreuve("seal", str(root), state=tmp_path)
    assert proc.returncode == 1 and "case 'case-001': no ground truth" in proc.stderr


def test_dicom_synthesis_from_the_command_line(tmp_path):
    root = tmp_path / "dcm"
    proc = epreuve("synth", str(root), "--cases", "1", "--size", "20", "--format", "dicom",
                   state=tmp_path)
    assert proc.returncode == 0
    assert len(list((root / "inputs/case-001/ct").glob("*.dcm"))) == 13
