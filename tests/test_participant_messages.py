"""What a participant reads: in a phase that hides per-case results, no message names a case,
its shape, spacing or values; text they control is printed verbatim, never as rich markup;
and `check` runs first the very case the smoke job runs."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from sqlalchemy import select

from engine.challenges import load_challenge
from engine.datasets import load, seal
from engine.db.models import ImageRow, JobRow, SubmissionRow, TeamRow
from engine.submissions import smoke_case, submit
from engine.synthetic import synth_dataset
from tests.conftest import REPO, build_image
from tests.engine_fixtures import cli_status, pin, registered_scene

CHALLENGE = """\
id: hidden-liver
title: Hidden per-case results
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}
metrics: {labels: [1]}
ranking: {metrics: [{metric: dice, label: 1}]}
phases:
  - id: hidden
    dataset: {path: data}
    limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}
    visibility: {logs: false, per_case: false}
    sample_cases: [case-002, case-001]
  - id: open
    dataset: {path: data}
    limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}
    visibility: {logs: true, per_case: true}
"""
LOG_LINE = "np.stack([d.pixel_array.T for d in ds], axis=-1)"
# writes a 5x6x7 mask for every case (the inputs are 24x24xN), and logs code with brackets
WRONG_SHAPE = f"""\
import json, os
import nibabel as nib, numpy as np
print({LOG_LINE!r}, flush=True)
for case in json.load(open("/input/cases.json"))["cases"]:
    os.makedirs(f"/output/{{case['case_id']}}", exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), np.eye(4)),
             f"/output/{{case['case_id']}}/mask.nii.gz")
"""


@pytest.fixture
def scene(tmp_path, monkeypatch):
    return registered_scene(tmp_path, monkeypatch, CHALLENGE, cases=3, size=24)


status = cli_status


def fake_failed_submission(sessions, phase_slug: str, team: str, message: str,
                           log_tail: str) -> int:
    """A submission whose smoke job ended OUTPUT_INVALID (rows as the worker writes them)."""
    from engine.db.models import PhaseRow

    with sessions() as session:
        phase = session.scalar(select(PhaseRow).where(PhaseRow.slug == phase_slug))
        image = ImageRow(image_id="sha256:" + "1" * 64, layers=[], reference="[red]x[/red]",
                         architecture="amd64", user="1000", size_bytes=1)
        owner = TeamRow(name=team)
        session.add_all([image, owner])
        session.flush()
        submission = SubmissionRow(phase_id=phase.id, team_id=owner.id, image_pk=image.id,
                                   status="failed", reason="OUTPUT_INVALID",
                                   message=f"the smoke case failed: {message}")
        session.add(submission)
        session.flush()
        session.add(JobRow(submission_id=submission.id, kind="smoke", case_ids=["case-002"],
                           status="failed", reason="OUTPUT_INVALID", message=message,
                           run_result={"log_tail": log_tail, "wall_seconds": 1.0,
                                       "cpu_seconds": 0.5, "peak_memory_bytes": 1 << 20}))
        session.commit()
        return submission.id


def test_rich_markup_in_logs_names_and_messages_is_shown_verbatim(scene):
    _, _, sessions = scene
    message = "case-002: /output/case-002/mask.nii.gz holds label(s) [7] [bold]"
    sub = fake_failed_submission(sessions, "open", "[bold]team[/bold]", message,
                                 f"{LOG_LINE}\n[red]not red[/red]\n")
    shown = status(str(sub))
    assert LOG_LINE in shown
    assert "[red]not red[/red]" in shown
    assert "([bold]team[/bold], hidden-liver/open)" in shown
    assert message in shown
    participant = status(str(sub), "--participant")  # an open phase shows all of it
    assert LOG_LINE in participant and message in participant


def test_a_hidden_phase_never_names_the_case_to_the_participant(scene):
    _, _, sessions = scene
    message = ("case case-002: /output/case-002/mask.nii.gz is not on the input image's voxel "
               "grid: shape (5, 6, 7) != (24, 24, 12); spacing (1.0, 1.0, 1.0) != (0.8, 0.8, "
               "2.5)")
    sub = fake_failed_submission(sessions, "hidden", "t", message, "")
    for view in (status(str(sub), "--participant"),
                 status(str(sub), "--participant", "--json")):
        assert "case-002" not in view and "(5, 6, 7)" not in view and "0.8" not in view
        assert "OUTPUT_INVALID" in view
        assert "An output was not valid (/output/<case_id>/mask.nii.gz, labels [0, 1, 2, 3])" \
            in view
        assert "epreuve check" in view
    organiser = json.loads(status(str(sub), "--json"))
    assert organiser["message"] == f"the smoke case failed: {message}"
    assert organiser["jobs"][0]["message"] == message


def test_the_smoke_case_is_the_first_sample_case(tmp_path):
    from engine.check import check_batches

    synth_dataset(tmp_path / "data", cases=3, seed=5, size=16)
    seal(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(CHALLENGE)
    challenge = load_challenge(tmp_path / "c.yaml")
    ids = load(tmp_path / "data").case_ids
    assert smoke_case(challenge.phase("hidden"), ids) == "case-002"
    assert check_batches(challenge.phase("hidden"), ids) == [["case-002"], ["case-001"]]
    assert smoke_case(challenge.phase("open"), ids) == "case-001"  # no samples: the first


@pytest.mark.docker
def test_a_real_wrong_shape_submission_in_a_hidden_phase(scene, docker_engine):
    from engine.check import dry_run
    from engine.worker import Worker
    from runners.docker import DockerRunner

    root, settings, sessions = scene
    build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")
    context = root / "wrong-shape"
    context.mkdir()
    (context / "wrong.py").write_text(WRONG_SHAPE)
    (context / "Dockerfile").write_text(textwrap.dedent("""\
        FROM epreuve-example/threshold:latest
        COPY wrong.py /opt/algorithm/wrong.py
        ENTRYPOINT ["python3", "/opt/algorithm/wrong.py"]
    """))
    tag = "epreuve-test/organiser-wrong-shape:latest"
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    with sessions() as session:
        checked = dry_run(session, settings, tag, "hidden-liver", "hidden")
        sub = submit(session, "hidden-liver", "hidden", "t", pin(tag, root)).id
        session.commit()
    # check stops where the smoke job stops: on the same case, with the same reason
    assert [run["cases"] for run in checked["runs"]] == [["case-002"]]
    assert not checked["ok"] and checked["reason"] == "OUTPUT_INVALID"
    runner = DockerRunner(state_dir=settings.state_dir / "runs")
    assert Worker(sessions, settings, runner, scoring_workers=1).run(until_idle=True) == 1
    with sessions() as session:
        (job,) = session.get(SubmissionRow, sub).jobs
        assert job.case_ids == ["case-002"] and job.reason == "OUTPUT_INVALID"
        assert "case-002" in job.message and "[5, 6, 7]" in job.message  # organisers see it
    participant = status(str(sub), "--participant")
    assert "OUTPUT_INVALID" in participant
    assert "case-002" not in participant and "5, 6, 7" not in participant
    assert "24, 24" not in participant
    organiser = status(str(sub))
    assert "case-002" in organiser and LOG_LINE in organiser
