"""A re-sealed dataset never silently changes existing results (issue 9).

Found: a finished leaderboard moved (Dice 0.76 to 0.63) when a case was added to the
dataset, the dataset re-sealed and the challenge re-created with --force, while n_failed
still said 0. Real datasets, real containers, real scoring; nothing mocked.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import func, select

from engine.datasets import load, seal
from engine.db.models import AggregateRow, CaseResultRow, EventRow, JobRow, SubmissionRow
from engine.leaderboard import leaderboard
from engine.rendering import leaderboard_blocks, leaderboard_report, print_table
from engine.reports import submission_report
from engine.rescore import rescore
from engine.results import compute_aggregates
from engine.scoring.cases import CasePair, LesionSettings, score_cases
from engine.scoring.segmentation import SegmentationSettings
from engine.submissions import register_challenge, submit
from engine.synthetic import synth_dataset
from engine.worker import Worker
from runners.docker import DockerRunner
from tests.engine_fixtures import build_examples, make_scene, pin

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


def run_worker(scene) -> int:
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    return Worker(scene.sessions, scene.settings, runner, scoring_workers=1).run(
        until_idle=True)


def writable(path: Path) -> None:
    """Sealing made the files read-only; an organiser editing the dataset makes them
    writable again."""
    for entry in [path, *path.rglob("*")]:
        entry.chmod(entry.stat().st_mode | stat.S_IWUSR)


def add_case(dataset: Path, scratch: Path) -> str:
    """The organiser's edit of the issue: one more case (the same generator, its next case)."""
    synth_dataset(scratch, cases=4, seed=21, size=32)  # make_scene's validation set, plus one
    for part in ("inputs", "ground_truth"):
        shutil.copytree(scratch / part / "case-004", dataset / part / "case-004")
    return "case-004"


def correct_ground_truth(dataset: Path, case_id: str, scratch: Path) -> None:
    """The organiser fixes a reference: same inputs, another label map (same grid)."""
    synth_dataset(scratch, cases=4, seed=99, size=32)
    target = dataset / "ground_truth" / case_id / "label.nii.gz"
    writable(target.parent)
    target.unlink()
    shutil.copy(scratch / "ground_truth" / "case-004" / "label.nii.gz", target)


def reseal_and_recreate(scene) -> str:
    writable(scene.root / "data" / "validation")
    version = seal(scene.root / "data" / "validation").version
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file, force=True)
        session.commit()
    return version


def board(scene) -> list:
    with scene.sessions() as session:
        return leaderboard(session, "test-liver", "validation")


def aggregates(session, submission_id: int) -> dict:
    return {a.metric: a.summary for a in session.scalars(select(AggregateRow).where(
        AggregateRow.submission_id == submission_id))}


# -- a case added: finished results stay, are marked stale, and are not rescored ---------


@pytest.fixture(scope="module")
def added(module_tmp, images, tars):
    """One finished submission; one queued when the dataset was re-sealed with a new case;
    one submitted after."""
    root = module_tmp("added")
    scene = make_scene(root, cases_per_run=3)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        old_version = load(root / "data/validation").version
        finished = submit(session, "test-liver", "validation", "finished",
                          pin(images["threshold"], tars)).id
        session.commit()
    run_worker(scene)
    before = board(scene)
    with scene.sessions() as session:
        stored_before = aggregates(session, finished)
        queued = submit(session, "test-liver", "validation", "queued",
                        pin(images["threshold"], tars)).id
        session.commit()
    add_case(root / "data/validation", root / "scratch")
    new_version = reseal_and_recreate(scene)
    after_reseal = board(scene)
    run_worker(scene)  # the queued submission's job meets the new seal
    with scene.sessions() as session:
        fresh = submit(session, "test-liver", "validation", "fresh",
                       pin(images["no-smoothing"], tars)).id
        session.commit()
    run_worker(scene)
    return dict(scene=scene, finished=finished, queued=queued, fresh=fresh, before=before,
                after_reseal=after_reseal, stored_before=stored_before,
                old_version=old_version, new_version=new_version)


def test_adding_a_case_and_resealing_moves_no_finished_score(added):
    before, after = added["before"], added["after_reseal"]
    assert [(e.team, e.scores, e.n_failed) for e in after] == \
        [(e.team, e.scores, e.n_failed) for e in before]
    assert before[0].scores["dice[1]"] > 0.8 and after[0].n_failed == 0


def test_the_stored_aggregates_use_the_submissions_own_case_set(added):
    scene = added["scene"]
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, added["finished"])
        assert submission.case_ids == ["case-001", "case-002", "case-003"]
        compute_aggregates(session, submission)  # again, after the re-seal
        again = aggregates(session, added["finished"])
        session.rollback()
    assert again == added["stored_before"]
    assert again["dice[1]"]["n"] == 3 and again["dice[1]"]["n_failed"] == 0


def test_an_entry_on_an_older_version_is_marked_stale(added):
    entries = {e.team: e for e in board(added["scene"])}
    assert entries["finished"].stale and entries["finished"].dataset_version == \
        added["old_version"]
    assert not entries["fresh"].stale and entries["fresh"].dataset_version == \
        added["new_version"]
    out = io.StringIO()
    print_table(Console(file=out, width=200), leaderboard_blocks(leaderboard_report(
        "test-liver", "validation", list(entries.values()))))
    shown = out.getvalue()
    assert f"{added['finished']} *" in shown and f"{added['fresh']} *" not in shown
    assert f"* computed on an older dataset version ({added['old_version'][:12]})" in shown
    assert "epreuve rescore test-liver validation" in shown
    with added["scene"].sessions() as session:
        report = submission_report(session, added["finished"])
        assert report["stale"] and report["dataset_version"] == added["old_version"]
        assert "stale" not in submission_report(session, added["finished"], participant=True)


def test_a_submission_after_the_reseal_runs_on_the_new_case_set(added):
    with added["scene"].sessions() as session:
        fresh = session.get(SubmissionRow, added["fresh"])
        assert fresh.status == "succeeded", fresh.message
        assert fresh.dataset_version == added["new_version"]
        assert sorted(r.case_id for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == fresh.id))) == [f"case-00{i}" for i in range(1, 5)]
        assert aggregates(session, fresh.id)["dice[1]"]["n"] == 4
        assert {j.dataset_version for j in fresh.jobs} == {added["new_version"]}
    # rank-then-aggregate pairs teams case by case: on the three cases both were run on
    entries = {e.team: e for e in board(added["scene"])}
    assert (entries["finished"].rank, entries["fresh"].rank) == (1, 2)


def test_a_job_queued_before_the_reseal_is_not_run_on_other_inputs(added):
    with added["scene"].sessions() as session:
        queued = session.get(SubmissionRow, added["queued"])
        assert queued.dataset_version == added["old_version"]
        (job,) = queued.jobs
        assert job.dataset_version == added["old_version"]
        assert (job.status, job.reason) == ("failed", "INFRASTRUCTURE")
        # no container was started: the record holds the attempt's provenance, no run
        assert set(job.run_result) == {"provenance"}
        assert "re-sealed since" in job.message and added["new_version"][:12] in job.message
        assert (queued.status, queued.reason) == ("failed", "INFRASTRUCTURE")
        assert queued.counts_against_quota is False
        assert "needs a re-run" in queued.message
        assert session.scalar(select(func.count()).select_from(CaseResultRow).where(
            CaseResultRow.submission_id == queued.id)) == 0
        participant = submission_report(session, queued.id, participant=True)
        assert "re-sealed" not in str(participant)  # the organisers' message stays theirs


def test_rescore_lists_the_new_case_as_needing_a_rerun_and_changes_nothing(added):
    scene = added["scene"]
    with scene.sessions() as session:
        (outcome,) = rescore(session, scene.settings, "test-liver", "validation")
        session.commit()
    assert outcome.submission_id == added["finished"] and not outcome.done
    assert outcome.needs_rerun == {"case-004": "new in this version"}
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, added["finished"])
        assert submission.dataset_version == added["old_version"]
        assert aggregates(session, submission.id) == added["stored_before"]
        assert session.scalar(select(EventRow.detail).where(
            EventRow.entity == "submission", EventRow.entity_id == submission.id)
            .order_by(EventRow.id.desc()).limit(1)).startswith("not rescored")
    assert [e.scores for e in board(scene) if e.team == "finished"] == \
        [added["before"][0].scores]


# -- a reference corrected: rescore from stored outputs, no container run -----------------


def test_rescore_scores_stored_outputs_against_corrected_ground_truth(tmp_path, images, tars):
    scene = make_scene(tmp_path, cases_per_run=3)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        kept = submit(session, "test-liver", "validation", "kept",
                      pin(images["threshold"], tars)).id
        tampered = submit(session, "test-liver", "validation", "tampered",
                          pin(images["no-smoothing"], tars)).id
        session.commit()
    run_worker(scene)
    with scene.sessions() as session:
        old = {r.case_id: r.metrics for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == kept))}
        jobs_before = session.scalar(select(func.count()).select_from(JobRow))
        tampered_row = session.scalar(select(CaseResultRow).where(
            CaseResultRow.submission_id == tampered, CaseResultRow.case_id == "case-001"))
        tampered_output = (scene.settings.outputs_dir / f"submission-{tampered}" /
                           f"job-{tampered_row.job_id}" / "case-001" / "mask.nii.gz")
    os.chmod(tampered_output, 0o644)
    kept_output = scene.settings.outputs_dir / f"submission-{kept}"
    shutil.copy(next(kept_output.rglob("case-002/mask.nii.gz")), tampered_output)

    correct_ground_truth(tmp_path / "data/validation", "case-002", tmp_path / "scratch")
    new_version = reseal_and_recreate(scene)
    assert all(e.stale for e in board(scene))

    with scene.sessions() as session:
        outcomes = {o.team: o for o in rescore(session, scene.settings, "test-liver",
                                               "validation")}
        session.commit()
    assert outcomes["kept"].done and outcomes["kept"].rescored == ["case-001", "case-002",
                                                                   "case-003"]
    assert outcomes["tampered"].needs_rerun == {
        "case-001": "its stored output is gone or changed"}

    with scene.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobRow)) == jobs_before
        submission = session.get(SubmissionRow, kept)
        assert submission.dataset_version == new_version
        new = {r.case_id: r.metrics for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == kept))}
        assert new["case-001"] == old["case-001"] and new["case-003"] == old["case-003"]
        assert new["case-002"]["dice[1]"] != old["case-002"]["dice[1]"]
        expected = _score_directly(scene, kept, "case-002")
        assert new["case-002"]["dice[1]"] == pytest.approx(expected)
        summary = aggregates(session, kept)["dice[1]"]
        assert summary["mean"] == pytest.approx(sum(m["dice[1]"] for m in new.values()) / 3)
        assert "rescored: dataset version" in session.scalar(select(EventRow.detail).where(
            EventRow.entity == "submission", EventRow.entity_id == kept)
            .order_by(EventRow.id.desc()).limit(1))
        assert session.get(SubmissionRow, tampered).dataset_version != new_version
    entries = {e.team: e for e in board(scene)}
    assert not entries["kept"].stale and entries["tampered"].stale
    assert entries["kept"].scores["dice[1]"] == pytest.approx(summary["mean"])


def _score_directly(scene, submission_id: int, case_id: str) -> float:
    """Dice of label 1 computed here, from the stored output and the corrected reference."""
    prediction = next((scene.settings.outputs_dir / f"submission-{submission_id}").rglob(
        f"{case_id}/mask.nii.gz"))
    reference = load(scene.root / "data/validation").ground_truth_path(case_id)
    scores = score_cases([CasePair(case_id, prediction, reference)],
                         SegmentationSettings(labels=(1, 2), nsd_tolerance_mm=4.0),
                         LesionSettings(enabled=False), workers=1)
    return scores[case_id][1]["dice"]


# -- the command line ----------------------------------------------------------------------


def test_rescore_through_the_epreuve_command(tmp_path, images):
    from tests.test_cli_end_to_end import Cli, docker_save

    make_scene(tmp_path, cases_per_run=3)
    cli = Cli(tmp_path)
    cli("challenge", "create", "test-liver.yaml")
    tar = docker_save(images["threshold"], tmp_path / "t.tar")
    cli("submit", str(tar), "-c", "test-liver", "-p", "validation", "-t", "t")
    cli("worker", "--until-idle")
    assert cli("rescore", "test-liver", "validation").stdout == (
        "nothing to rescore: every evaluated submission is on the current dataset version\n")
    old = load(tmp_path / "data/validation").version

    correct_ground_truth(tmp_path / "data/validation", "case-002", tmp_path / "scratch")
    writable(tmp_path / "data/validation")
    new = seal(tmp_path / "data/validation").version
    cli("challenge", "create", "test-liver.yaml", "--force")
    stale = cli("leaderboard", "test-liver", "validation").stdout
    assert re.search(r"│ t +│ +1 \* │", stale)
    assert f"* computed on an older dataset version ({old[:12]})" in stale
    assert cli.json("leaderboard", "test-liver", "validation")["entries"][0]["stale"] is True

    refused = cli("rescore", "test-liver", "validation", "--submission", "7", code=1)
    assert refused.stderr == "error: no submission 7 in this phase\n"
    done = cli("rescore", "test-liver", "validation", "--submission", "1")
    assert done.stdout == (f"submission 1 (t): rescored 3 case(s) from stored outputs "
                           f"(dataset {old[:12]} -> {new[:12]})\n")
    fresh = cli("leaderboard", "test-liver", "validation").stdout
    assert re.search(r"│ t +│ +1 │", fresh) and "older dataset version" not in fresh
    assert cli.json("status", "1")["stale"] is False
