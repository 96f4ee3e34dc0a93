"""The node registry: the machines that run jobs, as organisers see them.

A node describes itself once (engine/node_description.py: its name, slots, GPUs and
facts) and registers: remote nodes through the worker routes (engine/api/workers.py, one
row per worker token and name), local `epreuve worker` processes through the database
(engine/worker/local.py). Every claim and heartbeat is `heard_from`, with the latest reading of
each of its GPUs. A node not heard from for `lost_after` is marked lost by the sweep
(`sweep_lost`): its jobs go back to the queue as the platform's failure (INFRASTRUCTURE,
never the team's), and an event is kept. A lost node heard from again is active again; its
old attempts were fenced off when their jobs were re-queued (their calls get 409).

What a node sends is checked by engine/node_description.py. Domain code: flushes, never
commits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engine.db.models import JobRow, NodeRow, PhaseRow, SubmissionRow, utcnow
from engine.errors import Conflict, NotFound
from engine.node_description import NodeDescription, validated_samples
from engine.queue import record, take_back
from engine.statuses import ACTIVE_JOB_STATES, ON_A_NODE_JOB_STATES, NodeState
from runners.base import FailureReason

DEFAULT_LOST_LEASES = 3  # a node is lost after this many lease lengths unheard


# -- the registry ------------------------------------------------------------------------


def register(session: Session, description: NodeDescription, token_id: int | None,
             actor: str) -> NodeRow:
    """The node of this token and name, created or updated from its description (a
    restarted node keeps its row and history), active and just heard from."""
    node = session.scalar(select(NodeRow).where(
        NodeRow.name == description.name,
        NodeRow.token_id.is_(None) if token_id is None else NodeRow.token_id == token_id)
        .limit(1))
    if node is None:
        node = NodeRow(name=description.name, token_id=token_id, state=NodeState.ACTIVE.value,
                       gpu_samples={})
        session.add(node)
        session.flush()
        record(session, "node", node.id, None, NodeState.ACTIVE, actor, "registered")
    node.gpu_slots, node.cpu_slots = description.gpu_slots, description.cpu_slots
    node.gpus, node.facts = [dict(g) for g in description.gpus], dict(description.facts)
    heard_from(session, node, actor)
    return node


def retire(session: Session, node_id: int, actor: str) -> NodeRow:
    """Take a node out of the registry (a machine gone for good): its row and history stay
    (the provenance of its runs names it), it is no longer listed or alerted on. Refused
    while jobs run there: a node still heard from would only come back."""
    node = session.get(NodeRow, node_id, populate_existing=True)
    if node is None:
        raise NotFound(f"no node {node_id}")
    jobs_there = select(JobRow.id).where(JobRow.node_id == node.id,
                                         JobRow.status.in_(ON_A_NODE_JOB_STATES))
    was = node.state
    changed = session.execute(  # one statement: no job may be assigned between check and write
        update(NodeRow).where(NodeRow.id == node.id, NodeRow.state != NodeState.RETIRED,
                              ~jobs_there.exists())
        .values(state=NodeState.RETIRED.value)).rowcount
    if changed:
        record(session, "node", node.id, was, NodeState.RETIRED, actor, "retired")
    else:
        in_hand = session.scalars(jobs_there.order_by(JobRow.id)).all()
        if in_hand:
            raise Conflict(f"node {node.name} runs job(s) {', '.join(map(str, in_hand))}: "
                           "stop its worker first (its jobs are re-queued once it is lost), "
                           "then retire it")
    session.flush()
    session.refresh(node)
    return node


def node_of(session: Session, node_id: int, token_id: int | None) -> NodeRow:
    """The node with this id registered by this token; NotFound for any other (another
    token's node is no business of this one: not even its existence)."""
    node = session.get(NodeRow, node_id, populate_existing=True)
    if node is None or node.token_id != token_id:
        raise NotFound(f"no node {node_id} registered with this worker token: register again")
    return node


def heard_from(session: Session, node: NodeRow, actor: str,
               samples: Mapping[str, Any] | None = None, *, quiet_seconds: float = 0) -> None:
    """A claim or heartbeat: the node is alive (a lost one active again), with its GPUs'
    latest readings kept. Within `quiet_seconds` of the last one, an active node's
    sample-less call writes nothing (an idle node polls every half second)."""
    now = utcnow()
    if (not samples and node.state == NodeState.ACTIVE
            and (now - node.last_heartbeat).total_seconds() < quiet_seconds):
        return
    node.last_heartbeat = now
    if samples:
        node.gpu_samples = {**(node.gpu_samples or {}), **validated_samples(node.gpus, samples)}
    if node.state != NodeState.ACTIVE:
        record(session, "node", node.id, node.state, NodeState.ACTIVE, actor,
                "heard from again")
        node.state = NodeState.ACTIVE.value
    session.flush()


def assign(session: Session, job_id: int, node_id: int | None) -> None:
    """The job's current attempt runs on this node."""
    session.execute(update(JobRow).where(JobRow.id == job_id).values(node_id=node_id))
    session.flush()


def sweep_lost(session: Session, lost_after: timedelta, actor: str,
               now: datetime | None = None) -> list[int]:
    """Mark lost the active nodes unheard for `lost_after`, and re-queue their jobs at once
    (INFRASTRUCTURE); returns the ids of the jobs moved (queued, or failed when out of
    attempts: the caller moves their submissions on)."""
    now = now or utcnow()
    moved = []
    for node in session.scalars(select(NodeRow).where(
            NodeRow.state == NodeState.ACTIVE, NodeRow.last_heartbeat < now - lost_after)).all():
        changed = session.execute(
            update(NodeRow).where(NodeRow.id == node.id, NodeRow.state == NodeState.ACTIVE,
                                  NodeRow.last_heartbeat < now - lost_after)
            .values(state=NodeState.LOST.value)).rowcount
        if not changed:
            continue  # heard from meanwhile, or another sweeper won
        jobs = requeue_jobs_of(session, node, actor, now)
        record(session, "node", node.id, NodeState.ACTIVE, NodeState.LOST, actor,
               f"no heartbeat since {node.last_heartbeat.isoformat()}; "
               f"{len(jobs)} job(s) re-queued")
        moved.extend(jobs)
    session.flush()
    return moved


def requeue_jobs_of(session: Session, node: NodeRow, actor: str, now: datetime) -> list[int]:
    """The node's jobs in hand back to the queue (failed when out of attempts), their
    leases cleared: whatever the node says of them later is refused (409). A job being
    scored is the server's now, not the node's: left alone."""
    moved = []
    for job in session.scalars(select(JobRow).where(
            JobRow.node_id == node.id, JobRow.status.in_(ON_A_NODE_JOB_STATES))).all():
        if take_back(session, job, actor, now,
                     why=f"{FailureReason.INFRASTRUCTURE.value}: the node running this job "
                         f"({node.name}) was lost; it is run again",
                     too_often="the job's nodes were lost too often; the platform will look "
                               "into it"):
            moved.append(job.id)
    return moved


# -- what organisers see ----------------------------------------------------------------


def node_views(session: Session, *, challenge_ids: Iterable[str] | None = None,
               now: datetime | None = None, include_retired: bool = False
               ) -> list[dict[str, Any]]:
    """Every node (retired ones only when asked) with its slots, GPUs (and each one's
    latest reading), last heartbeat, state and the jobs it runs now. A node is shared: with
    `challenge_ids` (an organiser's), only those challenges' jobs are listed, the others
    only counted (`other_jobs`)."""
    now = now or utcnow()
    scope = None if challenge_ids is None else set(challenge_ids)
    nodes = session.scalars(select(NodeRow).where(
        True if include_retired else NodeRow.state != NodeState.RETIRED)
        .order_by(NodeRow.name, NodeRow.id)).all()
    running: dict[int, list[dict[str, Any]]] = {}
    others: Counter[int] = Counter()
    for job_id, node_id, status, submission_id, challenge in session.execute(
            select(JobRow.id, JobRow.node_id, JobRow.status, JobRow.submission_id,
                   PhaseRow.challenge_id)
            .join(SubmissionRow, SubmissionRow.id == JobRow.submission_id)
            .join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id)
            .where(JobRow.node_id.is_not(None), JobRow.status.in_(ACTIVE_JOB_STATES))
            .order_by(JobRow.id)):
        if scope is not None and challenge not in scope:
            others[node_id] += 1
            continue
        running.setdefault(node_id, []).append(
            {"job": job_id, "submission": submission_id, "status": str(status)})
    return [view(node, running.get(node.id, []), others[node.id], now) for node in nodes]


def view(node: NodeRow, jobs: list[dict[str, Any]], other_jobs: int,
         now: datetime) -> dict[str, Any]:
    samples = node.gpu_samples or {}
    return {"id": node.id, "name": node.name, "state": node.state,
            "slots": {"gpu": node.gpu_slots, "cpu": node.cpu_slots},
            "gpus": [{**gpu, "sample": samples.get(gpu["uuid"])} for gpu in node.gpus],
            "first_seen": node.first_seen.isoformat(),
            "last_heartbeat": node.last_heartbeat.isoformat(),
            "seconds_since_heartbeat": max(0.0, round(
                (now - node.last_heartbeat).total_seconds(), 1)),
            "jobs": jobs, "other_jobs": other_jobs}
