"""The states of jobs and submissions, and the kinds of jobs: typed, as FailureReason is.

They are `StrEnum`s, so a value read back from the database ("queued") equals its member
and is stored as that plain text.

    job:        queued -> leased -> running -> scoring -> succeeded | failed; or cancelled
    submission: queued -> running -> succeeded | failed | cancelled
    intake:     validating -> accepted (a submission) | refused
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    SCORING = "scoring"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SubmissionStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class IntakeStatus(StrEnum):
    """An uploaded image before it is a submission: validated outside the request."""

    VALIDATING = "validating"
    ACCEPTED = "accepted"  # a submission exists: follow it
    REFUSED = "refused"  # IMAGE_INVALID, or the submission was refused (quota, phase closed)


class Verdict(StrEnum):
    """What a reproduction found, case by case and overall (the worst of its cases)."""

    IDENTICAL = "identical"  # the same output bytes
    WITHIN_TOLERANCE = "within-tolerance"  # other bytes, every metric within the tolerance
    DIFFERS = "differs"  # a metric moved past its tolerance, or a case's validity changed


class NodeState(StrEnum):
    """A node in the registry (engine/nodes.py): lost when its heartbeats stop."""

    ACTIVE = "active"
    LOST = "lost"  # its jobs were re-queued; it becomes active again when it is heard from
    # taken out of the registry by an admin (a machine gone for good): not listed, not
    # alerted on; active again if it is ever heard from
    RETIRED = "retired"


class JobKind(StrEnum):
    SMOKE = "smoke"  # one case first: a broken image costs one case
    MAIN = "main"  # the other cases, in shards, once the smoke job passed


ACTIVE_JOB_STATES = (JobStatus.LEASED, JobStatus.RUNNING, JobStatus.SCORING)
# a node holds these; a SCORING job may be held by a scorer on the server's side instead
ON_A_NODE_JOB_STATES = (JobStatus.LEASED, JobStatus.RUNNING)
TERMINAL_JOB_STATES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
