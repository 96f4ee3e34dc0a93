"""The leaderboard's column-query path and its per-process cache give exactly the values of
the ORM path, on SQLite and PostgreSQL, for every ranking scheme; a submission that ends
moves a cached board."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import numpy as np
import pytest
from sqlalchemy import select

from engine.db.models import CaseResultRow, ChallengeRow, JobRow, SubmissionRow, TeamRow
from engine.leaderboard import latest_per_team, leaderboard, stability
from engine.leaderboard_cache import LeaderboardCache
from engine.results import compute_aggregates, metric_keys, results_by_case
from engine.statuses import JobKind, JobStatus, SubmissionStatus
from engine.submissions import challenge_definition, find_phase, get_or_create_team
from tests.api_fixtures import build_world

SCHEMES = ("aggregate-then-rank", "rank-then-aggregate", "test-based")


def add_submission(session, team_name: str, seed: int, *, missing: int = 0,
                   invalid: int = 0) -> int:
    """A succeeded submission to ch-a validation with seeded metrics: `invalid` cases with
    no valid output, `missing` cases with no result row at all."""
    phase, _ = find_phase(session, "ch-a", "validation")
    image = session.get(SubmissionRow, 1).image
    team = get_or_create_team(session, team_name)
    submission = SubmissionRow(phase=phase, team=team, image=image,
                               status=SubmissionStatus.SUCCEEDED, message="evaluated")
    session.add(submission)
    session.flush()
    job = JobRow(submission=submission, kind=JobKind.MAIN, case_ids=list(phase.case_ids),
                 status=JobStatus.SUCCEEDED, attempts=1)
    session.add(job)
    session.flush()
    rng = np.random.default_rng(seed)
    keys = metric_keys(challenge_definition(phase.challenge))
    for index, case_id in enumerate(phase.case_ids[missing:]):
        bad = index < invalid
        session.add(CaseResultRow(
            submission_id=submission.id, job_id=job.id, case_id=case_id, valid=not bad,
            metrics={} if bad else {k: float(rng.uniform(0, 10)) for k in keys},
            runtime_seconds=1.0, runtime_exact=True, output_sha256={}))
    session.flush()
    submission.finished_at = submission.created_at
    compute_aggregates(session, submission)
    session.flush()
    return submission.id


def use_scheme(session, scheme: str) -> None:
    row = session.get(ChallengeRow, "ch-a")
    definition = {**row.definition, "ranking": {**row.definition["ranking"], "scheme": scheme}}
    row.definition = definition
    row.definition_sha256 = hashlib.sha256(repr(definition).encode()).hexdigest()
    session.flush()


def orm_leaderboard(session) -> list[dict]:
    """The board computed from ORM rows (the path before the column query): every stored
    row passed in as a substitute, so nothing is read by the new query."""
    phase, _ = find_phase(session, "ch-a", "validation")
    stored = {s.id: {case_id: {"valid": r.valid, "metrics": r.metrics}
                     for case_id, r in results_by_case(session, s).items()}
              for s in latest_per_team(session, phase.id)}
    return [asdict(e) for e in leaderboard(session, "ch-a", "validation", substitute=stored)]


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    world = build_world(tmp_path, request.param)
    with world.sessions() as session:
        for seed, (name, missing, invalid) in enumerate([
                ("team-d", 0, 0), ("team-e", 1, 0), ("team-f", 0, 2), ("team-g", 0, 0)]):
            add_submission(session, name, seed, missing=missing, invalid=invalid)
        session.commit()
    return world


@pytest.mark.parametrize("scheme", SCHEMES)
def test_column_path_and_cache_equal_the_orm_path(world, scheme):
    with world.sessions() as session:
        use_scheme(session, scheme)
        session.commit()
        expected = orm_leaderboard(session)
        assert len(expected) == 6  # test-based: 3 cases tie every team
        assert scheme == "test-based" or len({e["rank"] for e in expected}) > 1
        assert [asdict(e) for e in leaderboard(session, "ch-a", "validation")] == expected
        boards = LeaderboardCache()
        first = boards.get(session, "ch-a", "validation")
        assert [asdict(e) for e in first] == expected
        assert boards.get(session, "ch-a", "validation") is first  # served from the cache


def test_stability_reads_the_same_values(world):
    with world.sessions() as session:
        use_scheme(session, "rank-then-aggregate")
        result = stability(session, "ch-a", "validation", resamples=20)
        assert set(result["rank_frequencies"]) == {"team-a", "team-b", "team-d", "team-e",
                                                   "team-f", "team-g"}
        assert 0 <= result["kendall_tau_mean"] <= 1


def test_a_submission_that_ends_moves_the_cached_board(world):
    boards = LeaderboardCache()
    with world.sessions() as session:
        before = boards.get(session, "ch-a", "validation")
        last = max(before, key=lambda e: e.rank).team
        # the last team submits again and is now perfect on every case
        team = session.scalar(select(TeamRow).where(TeamRow.name == last))
        new_id = add_submission(session, team.name, 99)
        for row in session.scalars(select(CaseResultRow).where(
                CaseResultRow.submission_id == new_id)):
            row.metrics = {k: (1.0 if k.startswith("dice") else 0.0) for k in row.metrics}
        compute_aggregates(session, session.get(SubmissionRow, new_id))
        session.commit()
        after = boards.get(session, "ch-a", "validation")
        assert after is not before
        assert [asdict(e) for e in after] == [asdict(e) for e in leaderboard(
            session, "ch-a", "validation")]
        mine = next(e for e in after if e.team == last)
        assert mine.submission_id == new_id and mine.rank == 1
