"""Closing a challenge: `epreuve challenge freeze CHALLENGE` writes the final record and
freezes every phase's results.

The record, one folder per phase, beside the data release (by default
`<data dir>/releases/<challenge>/final-record/`):

    <phase>/results.csv       every case of every evaluated submission: team, validity,
                              reason, each metric, runtime, output sha256
    <phase>/aggregates.json   each submission's aggregates
    <phase>/leaderboard.json  the ranking at the freeze
    <phase>/provenance.json   each submission's image, dataset version, runs (RunSpec,
                              run result and provenance as recorded)
    challenge.json            the definition, and SHA256SUMS of every file above

After the freeze a phase's results cannot change: submitting, re-running, rescoring and
cancelling are refused (`PhaseFrozen`, a Conflict). Reproducing stays open: it never
changes a result.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import Conflict, NotFound
from engine.frozen import PhaseFrozen, refuse_if_frozen  # noqa: F401  (the guard, re-exported)


def default_record_dir(data_dir: Path, challenge_id: str) -> Path:
    return Path(data_dir) / "releases" / challenge_id / "final-record"


def freeze(session: Session, challenge_id: str, target: Path, *, actor: str = "cli") -> Path:
    """Write the final record of every phase into `target` (new, or empty) and freeze the
    phases. Refused while any submission of the challenge is still queued or running.
    Flushes; the caller commits (after the record is on disk)."""
    from engine import queue
    from engine.db.models import ChallengeRow, PhaseRow, SubmissionRow
    from engine.db.models import utcnow as now

    challenge = session.get(ChallengeRow, challenge_id)
    if challenge is None:
        raise NotFound(f"no challenge {challenge_id!r}")
    phases = list(session.scalars(select(PhaseRow).where(
        PhaseRow.challenge_id == challenge_id).order_by(PhaseRow.id)))
    busy = list(session.scalars(select(SubmissionRow.id).where(
        SubmissionRow.phase_id.in_([p.id for p in phases]),
        SubmissionRow.status.not_in(queue.TERMINAL))))
    if busy:
        raise Conflict(f"submissions {', '.join(map(str, busy[:20]))} of {challenge_id} are "
                       "still being evaluated: wait for them (or cancel them), then freeze")
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise Conflict(f"{target} already holds files: a final record is never overwritten "
                       "(choose another --to)")
    files = {"challenge.json": _json(challenge.definition)}
    for phase in phases:
        files.update({f"{phase.slug}/{name}": body
                      for name, body in phase_record(session, challenge_id, phase).items()})
    _write(target, files)
    stamp = now()
    for phase in phases:
        if phase.frozen_at is None:
            phase.frozen_at = stamp
            queue.record(session, "phase", phase.id, "open", "frozen", actor,
                         f"final record written to {target}")
    session.flush()
    return target


def phase_record(session: Session, challenge_id: str, phase) -> dict[str, bytes]:
    from engine.db.models import AggregateRow, CaseResultRow, JobRow, SubmissionRow
    from engine.leaderboard import leaderboard
    from engine.statuses import SubmissionStatus

    submissions = list(session.scalars(select(SubmissionRow).where(
        SubmissionRow.phase_id == phase.id, SubmissionRow.status == SubmissionStatus.SUCCEEDED)
        .order_by(SubmissionRow.id)))
    results = {s.id: list(session.scalars(select(CaseResultRow).where(
        CaseResultRow.submission_id == s.id).order_by(CaseResultRow.id))) for s in submissions}
    aggregates = {s.id: {a.metric: a.summary for a in session.scalars(
        select(AggregateRow).where(AggregateRow.submission_id == s.id))} for s in submissions}
    provenance = {s.id: {
        "team": s.team.name, "dataset_version": s.dataset_version,
        "image": {"image_id": s.image.image_id, "tar_sha256": s.image.tar_sha256,
                  "archive_sha256": s.image.archive_sha256, "layers": s.image.layers},
        "source_url": s.source_url, "license": s.license, "prize_eligible": s.prize_eligible,
        "jobs": [{"job_id": j.id, "kind": j.kind, "case_ids": j.case_ids,
                  "status": j.status, "run_result": j.run_result}
                 for j in session.scalars(select(JobRow).where(JobRow.submission_id == s.id)
                                          .order_by(JobRow.id))]}
        for s in submissions}
    ranking = [asdict(entry) for entry in leaderboard(session, challenge_id, phase.slug)] \
        if submissions else []
    return {
        "results.csv": _csv(submissions, results),
        "aggregates.json": _json({str(k): v for k, v in aggregates.items()}),
        "leaderboard.json": _json(ranking),
        "provenance.json": _json({str(k): v for k, v in provenance.items()}),
    }


def _csv(submissions, results) -> bytes:
    metrics = sorted({key for rows in results.values() for row in rows for key in row.metrics
                      if not isinstance(row.metrics[key], dict)})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["submission_id", "team", "case_id", "valid", "reason", *metrics,
                     "runtime_seconds", "output_sha256"])
    for submission in submissions:
        for row in results[submission.id]:
            writer.writerow([submission.id, _cell(submission.team.name), row.case_id,
                             row.valid, row.reason or "",
                             *(row.metrics.get(m, "") for m in metrics),
                             "" if row.runtime_seconds is None else row.runtime_seconds,
                             json.dumps(row.output_sha256, sort_keys=True)])
    return out.getvalue().encode()


def _cell(text: str) -> str:
    """A team's name as a CSV cell a spreadsheet never runs as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _json(value) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, default=str).encode() + b"\n"


def _write(target: Path, files: dict[str, bytes]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(body)
    sums = "".join(f"{hashlib.sha256(body).hexdigest()}  {name}\n"
                   for name, body in sorted(files.items()))
    (target / "SHA256SUMS").write_text(sums)
