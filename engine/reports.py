"""What `epreuve status`, `leaderboard` and `check` show: plain data first, then rendered.

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

import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import Phase, challenge_definition
from engine.db.models import AggregateRow, CaseResultRow, EventRow, JobRow, SubmissionRow
from engine.submissions import find_phase
from runners.base import FailureReason
from runners.messages import human_bytes

# messages about the run as a whole: they never name a case or describe its data
RUN_LEVEL_REASONS = {FailureReason.TIMEOUT.value, FailureReason.OOM_KILLED.value,
                     FailureReason.OUTPUT_QUOTA.value, FailureReason.NONZERO_EXIT.value,
                     FailureReason.IMAGE_INVALID.value, FailureReason.CANCELLED.value}
# shown as escapes: C0 controls but line feed and tab, DEL, C1 controls, direction and
# zero-width marks
_NOT_INERT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e"
                        r"\u2066-\u2069]")
CHECK_HINT = ("This phase does not show per-case details: run `epreuve check` on the phase's "
              "public sample cases to see the full message.")


def terminal_text(text: object) -> str:
    """`text` as a terminal shows it without acting on it: each control character escaped."""
    return _NOT_INERT.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                     else f"\\u{ord(m.group()):04x}"), str(text))


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
    wait = queue.estimated_wait(session, submission)
    position = queue.position(session, submission)
    if position is not None:
        report["queue"] = {"jobs_ahead": position,
                           "estimated_start_seconds": None if wait is None else
                           round(wait.total_seconds())}
    report["jobs"] = [{**_job(job, show_logs), "message": shown(job.reason, job.message)}
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


def _plain(text: object) -> str:
    """For a markup string: escaped brackets, inert controls."""
    return escape(terminal_text(text))


def render(console: Console, report: dict[str, Any]) -> None:
    if "submission" not in report:
        table = Table(title="queue")
        table.add_column("state")
        table.add_column("jobs", justify="right")
        for state, count in sorted(report["jobs"].items()):
            table.add_row(_plain(state), str(count))
        console.print(table)
        return
    status = report["status"] + (f": {report['reason']}" if report["reason"] else "")
    console.print(f"[bold]submission {report['submission']}[/bold] "
                  f"({_plain(report['team'])}, {_plain(report['challenge'])}/"
                  f"{_plain(report['phase'])}): {_plain(status)}")
    if report.get("message"):
        console.print(Text(terminal_text(report["message"])), soft_wrap=True)
    if "queue" in report:
        eta = report["queue"]["estimated_start_seconds"]
        console.print(f"queued: {report['queue']['jobs_ahead']} job(s) ahead"
                      + (f", starts in about {eta} s" if eta is not None else ""))
    if report.get("prize_note"):
        console.print(Text(terminal_text(report["prize_note"]), style="yellow"))
    jobs = Table(title="jobs")
    for column in ("job", "kind", "cases", "status", "reason", "wall", "peak memory"):
        jobs.add_column(column)
    for job in report["jobs"]:
        jobs.add_row(str(job["job"]), _plain(job["kind"]), str(job["cases"]),
                     _plain(job["status"]), _plain(job["reason"] or "-"),
                     "-" if job["wall_seconds"] is None else f"{job['wall_seconds']:.2f} s",
                     human_bytes(job["peak_memory_bytes"]) if job["peak_memory_bytes"] else "-")
    console.print(jobs)
    for job in report["jobs"]:
        if job.get("log_tail"):
            console.print(Text(f"job {job['job']} log (tail):", style="dim"))
            console.print(Text(terminal_text(job["log_tail"][-1500:])), soft_wrap=True)
    for case in [c for c in report.get("cases", []) if not c["valid"]][:10]:
        console.print(Text(terminal_text(f"  {case['case_id']}: {case['reason']}: "
                                         f"{case['message']}")), soft_wrap=True)
    if report["aggregates"]:
        table = Table(title="aggregates (failed cases at their worst value)")
        for column in ("metric", "mean", "median", "95% CI", "failed"):
            table.add_column(column)
        for metric, s in sorted(report["aggregates"].items()):
            if "mean" in s:
                table.add_row(_plain(metric), f"{s['mean']:.4f}", f"{s['median']:.4f}",
                              f"{s['ci_low']:.4f} - {s['ci_high']:.4f}", str(s["n_failed"]))
            else:
                table.add_row(_plain(metric), f"{s['value']:.4f}", "-", "-",
                              str(s["n_failed"]))
        console.print(table)


def render_leaderboard(console: Console, challenge: str, phase: str, entries: list) -> None:
    table = Table(title=_plain(f"{challenge} / {phase}"))
    table.add_column("rank", justify="right")
    table.add_column("team")
    table.add_column("submission", justify="right")
    keys = list(entries[0].scores) if entries else []
    for key in keys:
        table.add_column(_plain(key), justify="right")
    for column in ("failed cases", "runtime / case", "prize"):
        table.add_column(column, justify="right")
    for e in entries:
        table.add_row(str(e.rank), Text(terminal_text(e.team)), str(e.submission_id),
                      *(f"{e.scores[k]:.4f} (#{e.metric_ranks[k]})" for k in keys),
                      str(e.n_failed),
                      "-" if e.runtime_per_case is None else f"{e.runtime_per_case:.2f} s",
                      "yes" if e.prize_eligible else "no")
    console.print(table if entries else "no evaluated submission yet")


def render_check(console: Console, report: dict[str, Any]) -> None:
    verdict = Text("would pass", style="green") if report["ok"] else \
        Text(f"would fail: {report.get('reason')}", style="red")
    console.print(Text.assemble(terminal_text(f"{report['image']} on {report['challenge']}/"
                                              f"{report['phase']}: "), verdict))
    console.print(Text(terminal_text(report.get("message") or "")), soft_wrap=True)
    run = report.get("run")
    if run:
        console.print(f"wall {run['wall_seconds'] or 0:.2f} s, CPU {run['cpu_seconds'] or 0:.2f}"
                      f" s, peak memory {human_bytes(run['peak_memory_bytes'])}")
        if run["log_tail"]:
            console.print(Text("log (tail):", style="dim"))
            console.print(Text(terminal_text(run["log_tail"][-1500:])), soft_wrap=True)
    for case_id, case in report["cases"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in case["metrics"].items()
                          if isinstance(v, float) and k.startswith(("dice", "hd95")))
        console.print(Text(terminal_text(f"  {case_id}: "
                                         f"{'valid' if case['valid'] else case['reason']} "
                                         f"{shown or case['message']}")))
