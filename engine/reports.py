"""What `epreuve status`, `leaderboard` and `check` show, as plain data (engine/rendering.py
prints it as a table, tsv, markdown or json).

A participant's view follows the phase's visibility: the typed reason always;
the container's log tail and per-case results only where the phase allows them,
never in a final (sealed) phase. Where a phase hides per-case results, a
participant's messages name no case, nor its shape, spacing or values: only a
run-level message (time, memory, exit code, image) is shown as it is; any other
becomes a generic message that says what to check (organisers see the full one).

Everything a participant or organiser typed (team names, messages, log tails,
image references) is printed as plain text, never as rich markup, and inert: a
control character (a terminal escape sequence, a bell, a backspace) or an invisible
direction mark is shown as its escape (`\x1b`), so a log cannot drive the reader's
terminal. A phase that hides per-case results shows a run-level failure (time,
memory, quota, exit) in words built from the phase's limits, never the stored text,
which can carry names the container chose (a sparse file named after a hidden case).
"""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import Challenge, Phase, challenge_definition
from engine.dataset_versions import is_stale
from engine.db.models import (
    AggregateRow,
    CaseResultRow,
    EventRow,
    JobRow,
    ReproductionRow,
    SubmissionRow,
)
from engine.rendering import terminal_text  # noqa: F401 (where callers have long found it)
from engine.submissions import find_phase
from runners.base import FailureReason
from runners.messages import human_bytes

HOST_PATHS_OF_SPEC = ("input_dir", "output_dir")  # a node's directories: never a team's
# messages about the run as a whole: they never name a case or describe its data
RUN_LEVEL_REASONS = {FailureReason.TIMEOUT.value, FailureReason.OOM_KILLED.value,
                     FailureReason.OUTPUT_QUOTA.value, FailureReason.NONZERO_EXIT.value,
                     FailureReason.IMAGE_INVALID.value, FailureReason.CANCELLED.value}
CHECK_HINT = ("This phase does not show per-case details: run `epreuve check` on the phase's "
              "public sample cases to see the full message.")


def participant_message(phase: Phase, output_hint: str, reason: str | None,
                        message: str | None) -> str | None:
    """What a participant may read of a failure message in this phase. The platform's own
    failures are described to organisers only, in every phase: their messages may name host
    paths and ground-truth files."""
    if reason == FailureReason.INFRASTRUCTURE.value:
        return ("The platform failed to run this submission (not your submission's fault): "
                "it is retried, and it never counts against your quota.")
    if not phase.hides_cases or reason is None:
        return message
    if reason in RUN_LEVEL_REASONS:
        return _run_level_message(phase, reason) or message
    if reason == FailureReason.OUTPUT_MISSING.value:
        return f"An expected output was not written ({output_hint}). {CHECK_HINT}"
    if reason == FailureReason.OUTPUT_INVALID.value:
        return (f"An output was not valid ({output_hint}): it must be readable, on the input "
                f"image's voxel grid (copy the input's header, do not resample) and hold only "
                f"the allowed values. {CHECK_HINT}")
    return f"The submission failed ({reason}). {CHECK_HINT}"


def _run_level_message(phase: Phase, reason: str) -> str | None:
    """A run-level failure in words from the phase's limits alone. The stored message may
    quote what the container chose (file names, an exit code): in a hidden phase those could
    carry a hidden case's id or data out."""
    limits = phase.limits
    if reason == FailureReason.TIMEOUT.value:
        return (f"The run exceeded its time limit ({limits.time_per_case:g} s per case) and was "
                "stopped. Make inference faster or look for a hang.")
    if reason == FailureReason.OOM_KILLED.value:
        return (f"The container ran out of memory (limit {human_bytes(limits.memory)}) and the "
                "kernel killed it. Reduce memory use; files in /tmp count towards this limit.")
    if reason == FailureReason.OUTPUT_QUOTA.value:
        return (f"The container wrote more than its output quota of "
                f"{human_bytes(limits.output_quota)} to /output (sparse files count at their "
                "full size, every hard link as a copy). Write only the expected files, "
                "compressed.")
    if reason == FailureReason.NONZERO_EXIT.value:
        return f"The container exited with a non-zero code. {CHECK_HINT}"
    return None  # the image's own checks and cancellations say nothing about a case


def _output_hint(challenge) -> str:
    if challenge.output.kind == "segmentation":
        return (f"/output/<case_id>/{challenge.output.filename}, labels "
                f"{challenge.output.labels}")
    columns = ",".join(challenge.output.classes)
    return f"/output/{challenge.output.filename}, columns case_id,{columns}"


def shown_message(submission: SubmissionRow, challenge: Challenge, phase: Phase, *,
                  participant: bool) -> str | None:
    """A submission's message as its reader may see it: `participant_message`'s rules for a
    participant, the stored text for organisers."""
    if not participant:
        return submission.message
    return participant_message(phase, _output_hint(challenge), submission.reason,
                               submission.message)


def queue_overview(session: Session) -> dict[str, Any]:
    counts = dict(session.execute(select(JobRow.status, func.count()).group_by(
        JobRow.status)).all())
    active = session.scalars(select(JobRow).where(JobRow.status.in_(queue.ACTIVE))).all()
    return {"jobs": counts,
            "running": [{"job": j.id, "submission": j.submission_id, "status": j.status,
                         "worker": j.lease_owner, "heartbeat_at": j.heartbeat_at}
                        for j in active]}


def submission_report(session: Session, submission_id: int, *,
                      participant: bool = False) -> dict[str, Any] | None:
    submission = session.get(SubmissionRow, submission_id)
    if submission is None:
        return None
    _, phase = find_phase(session, submission.phase.challenge_id, submission.phase.slug)
    hint = _output_hint(challenge_definition(submission.phase.challenge))

    def shown(reason: str | None, message: str | None) -> str | None:
        return participant_message(phase, hint, reason, message) if participant else message

    show_logs = not participant or (phase.visibility.logs and not phase.final)
    show_cases = not participant or (phase.visibility.per_case and not phase.final)
    report: dict[str, Any] = {
        "submission": submission.id, "team": submission.team.name,
        "challenge": submission.phase.challenge_id, "phase": submission.phase.slug,
        "status": submission.status, "reason": submission.reason,
        "message": shown(submission.reason, submission.message),
        "created_at": submission.created_at,
        "finished_at": submission.finished_at, "prize_eligible": submission.prize_eligible,
        "prize_note": submission.prize_note, "image": submission.image.image_id,
    }
    if not participant:  # a version names the hidden test set's seal: organisers only
        report["dataset_version"] = submission.dataset_version
        report["stale"] = is_stale(submission)
    wait = queue.estimated_wait(session, submission)
    position = queue.position(session, submission)
    if position is not None:
        report["queue"] = {"jobs_ahead": position,
                           "estimated_start_seconds": None if wait is None else
                           round(wait.total_seconds())}
    report["jobs"] = [{**_job(job, show_logs), "message": shown(job.reason, job.message),
                       "provenance": _provenance(job, phase if participant else None)}
                      for job in submission.jobs]
    report["aggregates"] = {a.metric: a.summary for a in session.scalars(
        select(AggregateRow).where(AggregateRow.submission_id == submission.id))}
    if show_cases:
        report["cases"] = [{"case_id": r.case_id, "valid": r.valid, "reason": r.reason,
                            "message": r.message, "metrics": r.metrics,
                            "runtime_seconds": r.runtime_seconds}
                           for r in session.scalars(select(CaseResultRow).where(
                               CaseResultRow.submission_id == submission.id)
                               .order_by(CaseResultRow.case_id))]
    if not participant:  # re-runs for reviewers (epreuve reproduce): never the results
        report["reproductions"] = [
            {"id": r.id, "source": r.source, "verdict": r.verdict, "image_id": r.image_id,
             "created_at": r.created_at, "actor": r.actor,
             "metrics_moved": r.summary.get("metrics_moved", [])}
            for r in session.scalars(select(ReproductionRow).where(
                ReproductionRow.submission_id == submission.id).order_by(ReproductionRow.id))]
    if not participant:
        report["events"] = [{"at": e.at, "entity": f"{e.entity} {e.entity_id}",
                             "change": f"{e.from_state or '-'} -> {e.to_state}",
                             "actor": e.actor, "detail": e.detail}
                            for e in session.scalars(select(EventRow).where(
                                ((EventRow.entity == "submission")
                                 & (EventRow.entity_id == submission.id))
                                | ((EventRow.entity == "job") & EventRow.entity_id.in_(
                                    [j.id for j in submission.jobs]))).order_by(EventRow.id))]
    return report


def _provenance(job: JobRow, participant_phase: Phase | None) -> dict[str, Any] | None:
    record = (job.run_result or {}).get("provenance")
    if not isinstance(record, dict) or participant_phase is None:
        return record
    return participant_provenance(record, participant_phase)


def participant_provenance(record: dict[str, Any], phase: Phase) -> dict[str, Any]:
    """A job's provenance as its team may read it: the node's name, engine, Docker, kernel
    and GPUs (model, driver, CUDA) and the RunSpec's limits, but no host path (the spec's
    mounts, the runtimes' binaries), no seal of the hidden test set (as for the report's
    dataset_version), and no case names or per-case hashes where the phase hides cases."""
    shown = copy.deepcopy(record)
    spec = shown.get("run_spec")
    if isinstance(spec, dict):
        for path in HOST_PATHS_OF_SPEC:
            spec.pop(path, None)
    docker = shown.get("docker")
    if isinstance(docker, dict) and isinstance(docker.get("runtimes"), dict):
        docker["runtimes"] = sorted(docker["runtimes"])  # names, not where they live
    dataset = shown.get("dataset")
    if isinstance(dataset, dict):
        cases = dataset.get("case_ids") or []
        shown["dataset"] = {"cases": len(cases)} if phase.hides_cases else {"case_ids": cases}
    outputs = shown.get("outputs")
    if isinstance(outputs, dict) and phase.hides_cases:
        shown["outputs"] = {"digest": outputs.get("digest")}
    return shown


def _job(job: JobRow, show_logs: bool) -> dict[str, Any]:
    run = job.run_result or {}
    entry = {"job": job.id, "kind": job.kind, "cases": len(job.case_ids), "status": job.status,
             "attempts": job.attempts, "reason": job.reason, "message": job.message,
             "wall_seconds": run.get("wall_seconds"), "cpu_seconds": run.get("cpu_seconds"),
             "peak_memory_bytes": run.get("peak_memory_bytes")}
    if show_logs and run:
        entry["log_tail"] = run.get("log_tail", "")[-4000:]
        entry["log_truncated"] = run.get("log_truncated")
    return entry
