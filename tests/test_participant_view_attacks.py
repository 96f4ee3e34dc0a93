"""Variants of leaks through what a participant reads. In a phase that hides per-case
results, a run-level failure (quota, exit, time, memory) was shown with its stored text,
and that text quotes what the container chose: a sparse file named after a hidden case
carried the case's id and shape out through the OUTPUT_QUOTA message. And log tails,
messages and team names reached the terminal with their escape sequences live."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from engine.db.models import ImageRow, JobRow, PhaseRow, SubmissionRow, TeamRow
from engine.submissions import submit
from tests.engine_fixtures import cli_status, pin, registered_scene, script_image

CHALLENGE = """\
id: hidden-views
title: Hidden per-case results
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1]}
metrics: {labels: [1]}
ranking: {metrics: [{metric: dice, label: 1}]}
phases:
  - id: hidden
    dataset: {path: data}
    limits: {memory: 512m, time_per_case: 30s, output_quota: 8m}
    visibility: {logs: false, per_case: false}
  - id: open
    dataset: {path: data}
    limits: {memory: 512m, time_per_case: 30s, output_quota: 8m}
    visibility: {logs: true, per_case: true}
"""
# what a container can put in a file name: the hidden case's id and its shape
LEAKED = "case-002_shape_16x16x10"


@pytest.fixture
def scene(tmp_path, monkeypatch):
    return registered_scene(tmp_path, monkeypatch, CHALLENGE, cases=2, size=16)


status = cli_status


def failed_submission(sessions, phase_slug: str, reason: str, message: str, *,
                      team: str = "t", log_tail: str = "") -> int:
    """A submission whose one job failed with this reason (rows as the worker writes them)."""
    with sessions() as session:
        phase = session.scalar(select(PhaseRow).where(PhaseRow.slug == phase_slug))
        image = ImageRow(image_id="sha256:" + "2" * 64, layers=[], reference="r",
                         architecture="amd64", user="1000", size_bytes=1)
        owner = TeamRow(name=team)
        session.add_all([image, owner])
        session.flush()
        submission = SubmissionRow(phase_id=phase.id, team_id=owner.id, image_pk=image.id,
                                   status="failed", reason=reason, message=message)
        session.add(submission)
        session.flush()
        session.add(JobRow(submission_id=submission.id, kind="smoke", case_ids=["case-002"],
                           status="failed", reason=reason, message=message,
                           run_result={"log_tail": log_tail, "wall_seconds": 1.0,
                                       "cpu_seconds": 0.5, "peak_memory_bytes": 1 << 20}))
        session.commit()
        return submission.id


QUOTA_MESSAGE = (f"What the container left in /output would occupy 1.0 GiB once copied, more "
                 f"than its output quota of 8.0 MiB; nothing was collected. Among them: "
                 f"{LEAKED} (sparse: 1.0 GiB apparent). Sparse files count at their full size.")


@pytest.mark.parametrize(("reason", "stored", "expected"), [
    ("OUTPUT_QUOTA", QUOTA_MESSAGE, "The container wrote more than its output quota of "
     "8.0 MiB to /output (sparse files count at their full size, every hard link as a copy)"),
    ("NONZERO_EXIT", "The container exited with code 42 (case-002 is 16x16x10).",
     "The container exited with a non-zero code. This phase does not show per-case details"),
    ("TIMEOUT", f"The run exceeded its time limit of 30 s ({LEAKED}).",
     "The run exceeded its time limit (30 s per case) and was stopped."),
    ("OOM_KILLED", f"The container ran out of memory ({LEAKED}).",
     "The container ran out of memory (limit 512.0 MiB) and the kernel killed it."),
])
def test_a_run_level_message_in_a_hidden_phase_carries_nothing_the_container_chose(
        scene, reason, stored, expected):
    _, _, sessions = scene
    sub = failed_submission(sessions, "hidden", reason, stored)
    for view in (status(str(sub), "--participant"),
                 status(str(sub), "--participant", "--json")):
        assert "case-002" not in view and "16x16x10" not in view and "code 42" not in view
        assert reason in view
    participant = json.loads(status(str(sub), "--participant", "--json"))
    assert participant["message"].startswith(expected)
    assert participant["jobs"][0]["message"].startswith(expected)
    organiser = json.loads(status(str(sub), "--json"))
    assert organiser["message"] == stored  # organisers see what was stored


def test_an_open_phase_shows_the_stored_run_level_message(scene):
    _, _, sessions = scene
    sub = failed_submission(sessions, "open", "OUTPUT_QUOTA", QUOTA_MESSAGE)
    assert json.loads(status(str(sub), "--participant", "--json"))["message"] == QUOTA_MESSAGE


def test_escape_sequences_in_logs_messages_and_names_reach_no_terminal_live(scene):
    _, _, sessions = scene
    sub = failed_submission(sessions, "open", "OUTPUT_INVALID",
                            "bad mask\x1b]0;owned\x07 here", team="team\x1b[8m",
                            log_tail="line one\n\x1b[2Jcleared\x9b31m\u202eevil\n")
    for view in (status(str(sub)), status(str(sub), "--participant")):
        assert "\x1b" not in view and "\x07" not in view and "\x9b" not in view
        assert "\u202e" not in view
        assert "line one\n\\x1b[2Jcleared\\x9b31m\\u202eevil" in view
        assert "bad mask\\x1b]0;owned\\x07 here" in view
        assert "(team\\x1b[8m, hidden-views/open)" in view
    # --json stays the data: JSON escapes it, and a program reads it back as it was
    assert json.loads(status(str(sub), "--json"))["team"] == "team\x1b[8m"


# -- a real container -------------------------------------------------------------------

SPARSE_SCRIPT = (
    "import json, os\n"
    "for case in json.load(open('/input/cases.json'))['cases']:\n"
    "    name = case['case_id'] + '_shape_16x16x10'\n"
    "    with open('/output/' + name, 'wb') as f:\n"
    "        f.truncate(1 << 30)\n"  # 1 GiB apparent, nothing written
)


@pytest.mark.docker
def test_a_sparse_file_named_after_a_hidden_case_leaks_nothing(scene, adversarial):
    from engine.worker import Worker
    from runners.docker import DockerRunner

    root, settings, sessions = scene
    tag = script_image(adversarial["probe"], SPARSE_SCRIPT, "epreuve-test/sparse-leak:latest",
                       root / "image")
    with sessions() as session:
        sub = submit(session, "hidden-views", "hidden", "t", pin(tag, root)).id
        session.commit()
    runner = DockerRunner(state_dir=settings.state_dir / "runs")
    Worker(sessions, settings, runner, scoring_workers=1).run(until_idle=True)
    with sessions() as session:
        (job,) = session.get(SubmissionRow, sub).jobs
        assert job.reason == "OUTPUT_QUOTA"
        assert "case-001_shape_16x16x10" in job.message  # organisers see the name
    for view in (status(str(sub), "--participant"),
                 status(str(sub), "--participant", "--json")):
        assert "OUTPUT_QUOTA" in view
        assert "case-001" not in view and "16x16x10" not in view


# -- team names -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "problem"), [
    ("", "a team name cannot be empty"),
    ("   ", "a team name cannot be empty"),
    ("x" * 101, "a team name has at most 100 characters"),
    ("team\x1b[8m", "team name 'team\\x1b[8m' holds a control or invisible character"),
    ("te\u200bam", "team name 'te\\u200bam' holds a control or invisible character"),
    ("admin\u202e", "team name 'admin\\u202e' holds a control or invisible character"),
    (" team", "team name ' team' has surrounding spaces or is not in Unicode NFC form; write "
              "'team'"),
    ("e\u0301quipe", "team name 'e\u0301quipe' has surrounding spaces or is not in Unicode "
                     "NFC form; write '\u00e9quipe'"),
])
def test_a_new_team_name_that_hides_or_acts_is_refused(scene, name, problem):
    from engine.submissions import SubmissionRefused, get_or_create_team

    _, _, sessions = scene
    with sessions() as session:
        with pytest.raises(SubmissionRefused) as refused:
            get_or_create_team(session, name)
        assert str(refused.value) == problem
        assert session.scalar(select(TeamRow).where(TeamRow.name == name)) is None


def test_a_team_name_with_brackets_is_an_ordinary_name(scene):
    from engine.submissions import get_or_create_team

    _, _, sessions = scene
    with sessions() as session:
        assert get_or_create_team(session, "[bold]Équipe[/bold]").name == "[bold]Équipe[/bold]"


def test_the_demo_prints_failure_messages_and_logs_as_text(scene):
    """Before, a log line "[/red]" raised rich's MarkupError in the demo's summary."""
    import io

    from rich.console import Console

    from engine.demo import _print_failures

    _, _, sessions = scene
    sub = failed_submission(sessions, "open", "NONZERO_EXIT", "exit [/bold] 1", team="[b]t",
                            log_tail="first\n[/red] closing tag\n\x1b[2Jcleared\n")
    out = io.StringIO()
    with sessions() as session:
        _print_failures(Console(file=out, width=200), session, {"[b]t": sub})
    assert out.getvalue().splitlines()[:4] == [
        f"[b]t (#{sub}): NONZERO_EXIT — exit [/bold] 1", "  log: first",
        "  log: [/red] closing tag", "  log: \\x1b[2Jcleared"]
