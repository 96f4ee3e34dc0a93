"""A hostile /output through the whole engine: a participant's fault, charged to the team,
never INFRASTRUCTURE (which would be retried three times and be free)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from engine.datasets import seal
from engine.db import session_factory
from engine.db.models import CaseResultRow, JobRow, SubmissionRow
from engine.submissions import register_challenge, submit
from engine.synthetic import synth_dataset
from engine.worker import Worker
from runners.docker import DockerRunner
from tests.engine_fixtures import pin, script_image, sqlite_settings

pytestmark = pytest.mark.docker

CHALLENGE = """
id: hostile-outputs
title: Outputs that break walkers
task: classification
output: {kind: probabilities, filename: predictions.csv, classes: [probability]}
ranking: {metrics: [{metric: roc_auc}]}
phases:
  - id: test
    dataset: {path: data}
    cases_per_run: 3
    limits: {memory: 512m, time_per_case: 30s}
"""

# A valid table, plus a path past PATH_MAX and a name that is not UTF-8.
SCRIPT = (
    "import json, os\n"
    "cases = json.load(open('/input/cases.json'))['cases']\n"
    "with open('/output/predictions.csv', 'w') as f:\n"
    "    f.write('case_id,probability\\n')\n"
    "    f.writelines(f\"{c['case_id']},0.5\\n\" for c in cases)\n"
    "open(b'/output/\\xff.txt', 'wb').write(b'x')\n"
    "os.chdir('/output')\n"
    "for _ in range(20):\n"
    "    os.mkdir('n' * 250); os.chdir('n' * 250)\n"
    "open('deep.txt', 'w').write('x')\n"
)


def test_a_hostile_output_tree_fails_the_job_once_as_output_invalid(tmp_path, adversarial):
    script_image(adversarial["probe"], SCRIPT, "epreuve-test/hostile-outputs:latest",
                 tmp_path / "image")
    synth_dataset(tmp_path / "data", seed=31, size=24, cases=3, task="classification")
    seal(tmp_path / "data")
    (tmp_path / "challenge.yaml").write_text(CHALLENGE)
    settings = sqlite_settings(tmp_path / "state")
    sessions = session_factory(settings.database_url)
    worker = Worker(sessions, settings, DockerRunner(state_dir=settings.state_dir / "runs"),
                    scoring_workers=1)
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        submission = submit(session, "hostile-outputs", "test", "team",
                            pin("epreuve-test/hostile-outputs:latest", tmp_path))
        session.commit()
    worker.run(until_idle=True)
    with sessions() as session:
        assert session.get(SubmissionRow, submission.id).status == "failed"
        jobs = session.scalars(select(JobRow).where(
            JobRow.submission_id == submission.id)).all()
        assert [(j.kind, j.status, j.reason, j.attempts) for j in jobs] == [
            ("smoke", "failed", "OUTPUT_INVALID", 1)]
        assert "\\xff.txt: the name is not UTF-8 text" in jobs[0].message
        assert "the path is longer than 1024 bytes" in jobs[0].message
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission.id)).all()
        assert [(r.valid, r.reason) for r in rows] == [(False, "OUTPUT_INVALID")]
