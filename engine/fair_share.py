"""Fair share: which queued job runs next, and how many run before a given submission.

The policy (docs/queue-policy.md says it for people):
1. The lowest priority level first: smoke jobs before main jobs.
2. Within a level, the team that has had the least service lately. A team's service is the
   slot-seconds of its jobs: each active job counts the longer of its elapsed time and the
   expected job duration (so a job is charged in full the moment it is leased), each job
   finished within `WINDOW` counts its duration. Ties go to the team whose last lease is
   oldest (a team never leased first), then the lower team id: round-robin.
3. Within that team, round-robin across its submissions: the one whose last lease is oldest.
4. Within that submission, the oldest job.

`lease_order` gives the teams and submissions in that order for queue.lease, which locks
the row; `jobs_ahead` replays the same policy on counts to tell a submission its place.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Float, case, cast, func, or_, select
from sqlalchemy.orm import Session

from engine.db.models import JobRow, SubmissionRow, utcnow
from engine.statuses import ACTIVE_JOB_STATES, JobStatus

WINDOW = timedelta(hours=1)
RECENT_JOBS = 50  # the expected duration is the mean of this many recent successes
DEFAULT_JOB_SECONDS = 1.0  # before any history: every job costs the same
NEVER = datetime.min.replace(tzinfo=UTC)  # the last lease of what was never leased


def seconds_between(session: Session, start, end):
    """`end - start` in seconds as a SQL expression, on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def expected_job_seconds(session: Session) -> float:
    """The mean duration of the most recent successful jobs (a fixed unit before any)."""
    recent = select(seconds_between(session, JobRow.started_at, JobRow.finished_at)
                    .label("took")).where(
        JobRow.status == JobStatus.SUCCEEDED, JobRow.started_at.is_not(None),
        JobRow.finished_at.is_not(None)).order_by(JobRow.finished_at.desc()).limit(RECENT_JOBS)
    mean = session.scalar(select(func.avg(cast(recent.subquery().c.took, Float))))
    return float(mean) if mean is not None and mean > 0 else DEFAULT_JOB_SECONDS


@dataclass
class TeamService:
    seconds: float = 0.0
    last_lease: datetime | None = None


def team_service(session: Session, expected: float,
                 now: datetime | None = None) -> dict[int, TeamService]:
    """Each team's recent service: its active jobs charged at least `expected` seconds, and
    the jobs it finished within the window; with its last lease."""
    now = now or utcnow()
    since = now - WINDOW
    service: dict[int, TeamService] = defaultdict(TeamService)
    began = func.coalesce(JobRow.started_at, JobRow.leased_at)
    active = session.execute(
        select(SubmissionRow.team_id, began).join(SubmissionRow)
        .where(JobRow.status.in_(ACTIVE_JOB_STATES))).all()
    for team_id, start in active:
        elapsed = (now - start).total_seconds() if start is not None else 0.0
        service[team_id].seconds += max(elapsed, expected)
    recent = session.execute(
        select(SubmissionRow.team_id,
               func.sum(case((JobRow.finished_at >= since,
                              seconds_between(session, began, JobRow.finished_at)))),
               func.max(JobRow.leased_at))
        .join(SubmissionRow)
        .where(or_(JobRow.status.in_(ACTIVE_JOB_STATES), JobRow.finished_at >= since))
        .group_by(SubmissionRow.team_id)).all()
    for team_id, seconds, last in recent:
        service[team_id].seconds += float(seconds or 0.0)
        service[team_id].last_lease = last
    return service


def team_key(team_id: int, service: TeamService) -> tuple:
    # to the millisecond: SQLite's julianday arithmetic is not exact, and a tie must stay one
    return (round(service.seconds, 3), service.last_lease or NEVER, team_id)


def lease_order(session: Session, gpus_available: int,
                gpus_at_least: int = 0) -> Iterator[list[int]]:
    """For each team in the order the policy tries them, its waiting submissions in
    round-robin order, at the lowest priority level this node has work at (jobs needing
    between `gpus_at_least` and `gpus_available` GPUs). Lazy: a lease usually needs only the
    first team's."""
    fits = (JobRow.gpus <= gpus_available, JobRow.gpus >= gpus_at_least)
    level = session.scalar(select(func.min(JobRow.priority)).where(
        JobRow.status == JobStatus.QUEUED, *fits))
    if level is None:
        return
    waiting = session.execute(
        select(SubmissionRow.team_id, JobRow.submission_id).join(SubmissionRow)
        .where(JobRow.status == JobStatus.QUEUED, JobRow.priority == level, *fits)
        .distinct()).all()
    by_team: dict[int, list[int]] = defaultdict(list)
    for team_id, submission_id in waiting:
        by_team[team_id].append(submission_id)
    service = team_service(session, expected_job_seconds(session))
    for team in sorted(by_team, key=lambda team: team_key(team, service[team])):
        last = submission_last_leases(session, by_team[team])
        yield sorted(by_team[team], key=lambda s: (last.get(s) or NEVER, s))


def submission_last_leases(session: Session, submission_ids: list[int]) -> dict[int, datetime]:
    if not submission_ids:
        return {}
    rows = session.execute(
        select(JobRow.submission_id, func.max(JobRow.leased_at))
        .where(JobRow.submission_id.in_(submission_ids))
        .group_by(JobRow.submission_id)).all()
    return {submission_id: last for submission_id, last in rows if last is not None}


@dataclass(order=True)
class _Team:
    """A team in the replay: ordered like team_key, with its submissions' queued counts."""
    key: tuple
    team_id: int = field(compare=False)
    submissions: list = field(compare=False, default_factory=list)  # heap of [last, id, n]


def jobs_ahead(session: Session, submission_id: int) -> int | None:
    """How many queued jobs the policy leases before this submission's first queued job,
    as the queue stands (any node may take any job; None: nothing of it is queued)."""
    queued = session.execute(
        select(JobRow.priority, SubmissionRow.team_id, JobRow.submission_id, func.count())
        .join(SubmissionRow).where(JobRow.status == JobStatus.QUEUED)
        .group_by(JobRow.priority, SubmissionRow.team_id, JobRow.submission_id)).all()
    levels = sorted({priority for priority, _, s, _ in queued if s == submission_id})
    if not levels:
        return None
    expected = expected_job_seconds(session)
    service = team_service(session, expected)
    last = submission_last_leases(session, [s for _, _, s, _ in queued])
    ahead = sum(n for priority, _, _, n in queued if priority < levels[0])
    level_counts = [(team, s, n) for priority, team, s, n in queued if priority == levels[0]]
    clock = utcnow()
    for priority in sorted({p for p, _, _, _ in queued if p < levels[0]}):
        # the levels before still charge their teams: replay them for the service they add
        clock = charge_level(service, last, [(t, s, n) for p, t, s, n in queued
                                             if p == priority], expected, clock)
    return ahead + replay_until(service, last, level_counts, submission_id, expected, clock)


def _teams(service, last, counts) -> list[_Team]:
    teams: dict[int, _Team] = {}
    for team_id, submission_id, n in counts:
        team = teams.setdefault(team_id, _Team(team_key(team_id, service[team_id]), team_id))
        team.submissions.append([last.get(submission_id) or NEVER, submission_id, n])
    for team in teams.values():
        heapq.heapify(team.submissions)
    heap = list(teams.values())
    heapq.heapify(heap)
    return heap


def _lease_one(heap: list[_Team], service, last, expected: float, clock: datetime) -> int:
    """Take the policy's next job from the replay, charging it as a real lease would
    (its team's service and last lease, its submission's last lease); returns the
    submission id."""
    team = heapq.heappop(heap)
    chosen = heapq.heappop(team.submissions)
    last[chosen[1]] = clock
    chosen[2] -= 1
    if chosen[2]:
        chosen[0] = clock
        heapq.heappush(team.submissions, chosen)
    state = service[team.team_id]
    state.seconds += expected
    state.last_lease = clock
    if team.submissions:
        team.key = team_key(team.team_id, state)
        heapq.heappush(heap, team)
    return chosen[1]


def replay_until(service, last, counts, submission_id: int, expected: float,
                 clock: datetime) -> int:
    heap = _teams(service, last, counts)
    leased = 0
    while heap:
        clock += timedelta(microseconds=1)  # each replayed lease later than the last
        if _lease_one(heap, service, last, expected, clock) == submission_id:
            return leased
        leased += 1
    raise RuntimeError("the replay never reached the submission's queued job")


def charge_level(service, last, counts, expected: float, clock: datetime) -> datetime:
    heap = _teams(service, last, counts)
    while heap:
        clock += timedelta(microseconds=1)
        _lease_one(heap, service, last, expected, clock)
    return clock
