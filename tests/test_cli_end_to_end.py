"""Every organiser's and participant's command through the real `epreuve` process: its own
data directory, database and state, real images and containers. Exit codes and what is
printed are asserted exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_fixtures import build_examples, make_scene

pytestmark = pytest.mark.docker

EPREUVE = str(Path(sys.executable).parent / "epreuve")
USER = os.environ.get("USER", "unknown")


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


class Cli:
    """The command as a user in `root` runs it: everything it writes stays under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "EPREUVE_DATA_DIR": str(root / "data-dir"),
                    "EPREUVE_DATABASE_URL": f"sqlite:///{root / 'cli.db'}",
                    "EPREUVE_STATE_DIR": str(root / "state"), "COLUMNS": "250",
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([EPREUVE, *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc

    def json(self, *args: str, code: int = 0):
        return json.loads(self(*args, "--json", code=code).stdout)


def image_id(reference: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", reference],
                          check=True, capture_output=True, text=True).stdout.strip()


def docker_save(reference: str, tar: Path) -> Path:
    subprocess.run(["docker", "save", reference, "-o", str(tar)], check=True)
    return tar


def sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture
def cli(tmp_path):
    make_scene(tmp_path, cases_per_run=2)  # sealed datasets and test-liver.yaml, in tmp_path
    cli = Cli(tmp_path)
    created = cli("challenge", "create", "test-liver.yaml")
    heading, phases = created.stdout.rstrip("\n").split("; phases: ")
    assert heading == "challenge test-liver: Test challenge"
    # in no particular order (the command does not sort them)
    assert sorted(phases.split(", ")) == ["closed (3 cases)", "final (4 cases)",
                                          "validation (3 cases)"]
    return cli


def test_challenge_create_refuses_an_unsealed_dataset(tmp_path):
    make_scene(tmp_path)
    (tmp_path / "data/validation/manifest.json").chmod(0o644)
    (tmp_path / "data/validation/manifest.json").unlink()
    refused = Cli(tmp_path)("challenge", "create", "test-liver.yaml", code=1)
    assert refused.stdout == ""
    assert refused.stderr.startswith(
        "error: test-liver.yaml, line 12, phases[0].dataset.path: phase validation: ")
    assert refused.stderr.endswith("is not sealed: no manifest.json (run `epreuve dataset seal`)\n")
    assert "data/validation" in refused.stderr and "Traceback" not in refused.stderr


def test_submit_status_cancel_worker_leaderboard(cli, images, tmp_path):
    saved = docker_save(images["threshold"], tmp_path / "full.tar")
    submitted = cli("submit", images["threshold"], "-c", "test-liver", "-p", "validation",
                    "--team", "full")  # a local image: saved by the command, then intake
    # (the progress bar, gone when done, leaves an empty line first)
    assert submitted.stdout.lstrip("\n") == (
        f"submission 1 queued (image {image_id(images['threshold'])[:19]}, archive sha256 "
        f"{sha256(saved)[:12]})\n")
    assert submitted.stderr == ""

    tar = docker_save(images["no-smoothing"], tmp_path / "ablated.tar")  # as uploaded
    ablated = cli("submit", str(tar), "-c", "test-liver", "-p", "validation", "-t", "ablated")
    assert ablated.stdout.lstrip("\n") == (
        f"submission 2 queued (image {image_id(images['no-smoothing'])[:19]}, archive sha256 "
        f"{sha256(tar)[:12]})\n")
    cli("submit", str(tar), "-c", "test-liver", "-p", "validation", "-t", "oops")

    assert cli.json("status") == {"jobs": {"queued": 3}, "running": []}
    queued = cli.json("status", "2")
    assert (queued["status"], queued["reason"], queued["team"]) == ("queued", None, "ablated")
    assert queued["queue"] == {"jobs_ahead": 1, "estimated_start_seconds": None}

    assert cli("cancel", "3", "--why", "wrong image").stdout == "submission 3 cancelled\n"
    cancelled = cli.json("status", "3")
    assert (cancelled["status"], cancelled["reason"], cancelled["message"]) == (
        "cancelled", "CANCELLED", f"cancelled by cli ({USER}): wrong image")
    again = cli("cancel", "3", code=1)
    assert again.stderr == "error: submission 3 already ended (cancelled)\n"

    worked = cli("worker", "--until-idle")
    assert worked.stdout.endswith("worker stopped after 4 job(s)\n")  # 2 x (smoke + main)

    done = cli.json("status", "1", "--participant")
    assert (done["status"], done["reason"], done["message"]) == (
        "succeeded", None, "evaluated: see the leaderboard")
    assert [(j["kind"], j["status"]) for j in done["jobs"]] == [
        ("smoke", "succeeded"), ("main", "succeeded")]
    assert [c["case_id"] for c in done["cases"]] == ["case-001", "case-002", "case-003"]
    assert "events" not in done  # the organiser's history is not the participant's
    human = cli("status", "1").stdout
    assert human.startswith("submission 1 (full, test-liver/validation): succeeded\n"
                            "evaluated: see the leaderboard\n")

    board = cli.json("leaderboard", "test-liver", "validation")
    assert [(e["rank"], e["team"], e["submission_id"], e["n_failed"])
            for e in board["entries"]] == [(1, "full", 1, 0), (2, "ablated", 2, 0)]
    assert board["stability"] is None
    theirs = {c["case_id"]: c["metrics"] for c in cli.json("status", "2")["cases"]}
    for case in done["cases"]:  # full beats ablated on every case, in both ranked metrics...
        ours, other = case["metrics"], theirs[case["case_id"]]
        assert ours["dice[1]"] > other["dice[1]"] and ours["hd95[1]"] < other["hd95[1]"]
    # ... so every bootstrap resample of the cases ranks it first: tau is 1 in each
    shown = cli("leaderboard", "test-liver", "validation", "--stability", "20").stdout
    assert ("ranking stability over 20 bootstrap samples of cases: Kendall's tau mean 1.000, "
            "median 1.000\n  ablated: #2: 100%\n  full: #1: 100%\n") in shown


def test_submit_refusals_name_the_reason(cli, images):
    absent = cli("submit", "epreuve-test/never-built:latest", "-c", "test-liver", "-p",
                 "validation", code=1)
    assert absent.stderr == ("error: IMAGE_INVALID: no local image "
                             "'epreuve-test/never-built:latest': build it or give the path of "
                             "a `docker save` tar\n")
    closed = cli("submit", images["threshold"], "-c", "test-liver", "-p", "closed", code=1)
    assert closed.stderr == ("error: phase closed of test-liver is not open: it closed "
                             "2020-01-01 00:00 UTC\n")
    unknown = cli("submit", images["threshold"], "-c", "nope", "-p", "validation", code=1)
    assert unknown.stderr == ("error: no challenge 'nope': create it first (epreuve challenge "
                              "create FILE)\n")
    assert cli("cancel", "99", code=1).stderr == "error: no submission 99\n"
    assert cli("status", "99", code=1).stderr == "error: no submission 99\n"
    assert cli.json("status") == {"jobs": {}, "running": []}  # nothing was queued


def test_check_reports_what_the_platform_would(cli, images):
    good = cli.json("check", images["threshold"], "-c", "test-liver")
    assert (good["ok"], good["phase"], good["reason"]) == (True, "validation", None)
    assert good["message"] == ("every sample case produced a valid output (the smoke case "
                               "first, as a submission's smoke job runs it)")
    assert list(good["cases"]) == ["case-001"] and good["cases"]["case-001"]["valid"]
    bad = cli.json("check", images["broken"], "-c", "test-liver", "-p", "validation", code=1)
    assert (bad["ok"], bad["reason"]) == (False, "NONZERO_EXIT")
    assert "weights.pt" in bad["run"]["log_tail"]
    human = cli("check", images["broken"], "-c", "test-liver", code=1).stdout
    assert human.startswith(f"{images['broken']} on test-liver/validation: would fail: "
                            "NONZERO_EXIT\n")
    assert cli.json("status") == {"jobs": {}, "running": []}  # a dry run queues nothing


def test_expected_failures_are_an_error_line_and_an_exit_code(cli, images, tmp_path):
    """Every expected failure goes through the one error family (engine/errors.py): a line
    the user can act on and its exit code, never a traceback."""
    nope = cli("check", images["threshold"], "-c", "test-liver", "-p", "nope", code=1)
    assert nope.stdout == ""
    assert nope.stderr == ("error: challenge test-liver has no phase 'nope' (phases: "
                           "validation, final, closed)\n")
    unknown = cli("check", images["threshold"], "-c", "no-such-challenge", code=1)
    assert unknown.stderr == "error: no challenge 'no-such-challenge'\n"

    sample = tmp_path / "data/validation/inputs/case-001"
    image = next(sample.iterdir())
    image.chmod(0o644)
    image.write_bytes(image.read_bytes()[:-1])  # the sealed test set tampered with
    tampered = cli("check", images["threshold"], "-c", "test-liver", code=1)
    assert tampered.stdout == ""
    assert tampered.stderr.startswith(f"error: dataset {tmp_path / 'data/validation'} no "
                                      "longer matches its seal")
    assert f"changed: inputs/case-001/{image.name}" in tampered.stderr
    assert "Traceback" not in nope.stderr + unknown.stderr + tampered.stderr
