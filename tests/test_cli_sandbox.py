"""`epreuve sandbox run` as a participant types it: real process, real containers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

EPREUVE = [str(Path(sys.executable).parent / "epreuve")]
REQUIRED_KEYS = {"status", "reason", "exit_code", "wall_seconds", "cpu_seconds",
                 "peak_memory_bytes", "output_bytes", "log_tail", "log_truncated"}


def sandbox(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EPREUVE, "sandbox", "run", *args], capture_output=True, text=True,
                          timeout=300)


def test_json_result_of_a_successful_run(adversarial, tmp_path):
    output = tmp_path / "out"
    proc = sandbox(adversarial["probe"], "--output", str(output), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result.keys() >= REQUIRED_KEYS
    assert result["status"] == "succeeded" and result["reason"] is None
    assert result["output_bytes"] == 6
    assert (output / "hello.txt").exists()


def test_json_result_of_a_timeout_and_exit_status(adversarial):
    proc = sandbox("--json", "--timeout", "1", "--grace", "1", adversarial["probe"],
                   "--", "python3", "/opt/probes/ignore_sigterm.py")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "failed" and result["reason"] == "TIMEOUT"


def test_limits_are_parsed_from_human_sizes(adversarial):
    proc = sandbox("--json", "--memory", "96m", adversarial["probe"], "--",
                   "python3", "/opt/probes/memory_hog.py")
    result = json.loads(proc.stdout)
    assert result["reason"] == "OOM_KILLED"
    assert "96.0 MiB" in result["message"]


def test_missing_image_is_image_invalid(docker_engine):
    proc = sandbox("--json", "epreuve-test/absent:never")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["reason"] == "IMAGE_INVALID"


def test_human_output_names_the_reason(adversarial):
    proc = sandbox(adversarial["probe"], "--", "sh", "-c", "echo oops; exit 4")
    assert proc.returncode == 1
    assert "NONZERO_EXIT" in proc.stdout and "oops" in proc.stdout


def test_bad_size_is_a_usage_error():
    proc = sandbox("--memory", "lots", "any-image")
    assert proc.returncode == 2
    assert "not a size" in proc.stderr


def test_each_format_shows_the_same_run(adversarial):
    command = ("--", "sh", "-c", "printf 'a|b\\tc <i>\\n'; exit 4")
    data = json.loads(sandbox(adversarial["probe"], "--format", "json", *command).stdout)
    assert (data["reason"], data["exit_code"]) == ("NONZERO_EXIT", 4)
    as_tsv = sandbox(adversarial["probe"], "--format", "tsv", *command)
    assert as_tsv.returncode == 1
    assert as_tsv.stdout.startswith("# failed: NONZERO_EXIT\nexit code\t4\n")
    assert "\n# a|b\\tc <i>\n" in as_tsv.stdout  # the log line, its tab escaped
    as_markdown = sandbox(adversarial["probe"], "--format", "markdown", *command).stdout
    assert "| exit code | 4 |" in as_markdown
    assert "```text\na|b\tc <i>\n```" in as_markdown  # a log is fenced, as it is
