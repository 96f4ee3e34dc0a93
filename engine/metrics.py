"""Prometheus metrics for the server's /metrics, under the names dashboards already expect.

    epreuve_submissions_total{state,reason}      counter: submissions that entered each state
    epreuve_jobs_total{kind,state,reason}        counter: jobs that entered each state
    epreuve_queue_jobs{challenge,phase,state}    gauge: jobs queued, leased, running, scoring
    epreuve_job_runtime_seconds{kind}            histogram: observed when a job ends
    epreuve_workers{state="up"|"busy"}           gauge: lease owners heard from recently
    epreuve_nodes{state="active"|"lost"|"retired"}  gauge: nodes in the registry (engine/nodes.py)
    epreuve_node_last_heartbeat_seconds{node}    gauge: unix time of a node's last heartbeat
    epreuve_node_heartbeat_age_seconds{node}     gauge: seconds since then (the alert's signal;
                                                 none for a retired node)
    epreuve_metrics_database_up                  gauge: 0 when the database did not answer
    DCGM_FI_DEV_GPU_UTIL / _FB_USED / _POWER_USAGE / _TOTAL_ENERGY_CONSUMPTION
                                                 gauges per GPU: gpu, UUID, Hostname labels,
                                                 as NVIDIA's dcgm-exporter names them
    epreuve_http_requests_total{route,method,status}, epreuve_http_request_duration_seconds
                                                 from the `RequestMetrics` ASGI middleware

The counts come from the database at scrape time (a custom collector), so every server
process reports the same numbers. The `_total` counters count transitions, read from the
append-only events table: a count of rows by their current state would go down when a job
moves on, which a counter must never do. The reason of a terminal state is its row's.

Labels are bounded sets: states, kinds and reasons are the engine's enums (anything else
reads "other"), challenges and phases are the organisers', routes are templates, methods
a known list. Never a submission id, a team name, or a raw path.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from engine.db.models import EventRow, JobRow, NodeRow, PhaseRow, SubmissionRow, utcnow
from engine.gpu_metrics import (  # noqa: F401 - re-exported: one place to look
    DCGM_FIELDS,
    GPU_SAMPLES,
    GPUCollector,
    GPUSample,
    GPUSamples,
    gpu_sample_recorder,
    record_gpu_sample,
)
from engine.statuses import (
    ON_A_NODE_JOB_STATES,
    JobKind,
    JobStatus,
    NodeState,
    SubmissionStatus,
)
from runners.base import FailureReason

log = logging.getLogger(__name__)

OTHER, NONE = "other", "none"
REASONS = frozenset(reason.value for reason in FailureReason)
SUBMISSION_STATES = frozenset(state.value for state in SubmissionStatus)
JOB_STATES = frozenset(state.value for state in JobStatus)
JOB_KINDS = frozenset(kind.value for kind in JobKind)
NODE_STATES = frozenset(state.value for state in NodeState)
QUEUE_STATES = (JobStatus.QUEUED, JobStatus.LEASED, JobStatus.RUNNING, JobStatus.SCORING)
TERMINAL_SUBMISSION_STATES = (SubmissionStatus.SUCCEEDED, SubmissionStatus.FAILED,
                              SubmissionStatus.CANCELLED)
TERMINAL_JOB_STATES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# A worker renews its lease every 10 s for 60 s: silent for longer than a lease, it is gone
HEARTBEAT_WINDOW = timedelta(seconds=90)
JOB_RUNTIME_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                       28800, 86400, math.inf)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def _allowed(value: Any, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def _reason(value: Any) -> str:
    return NONE if value is None else _allowed(value, REASONS)


# -- counts from the database, at scrape time ----------------------------------------------

class DatabaseCollector:
    """Submissions, jobs, the queue and the workers, counted in the database per scrape."""

    def __init__(self, sessions: sessionmaker[Session], *,
                 heartbeat_window: timedelta = HEARTBEAT_WINDOW,
                 registered_workers: Callable[[], Iterable[str]] | None = None,
                 clock: Callable[[], datetime] = utcnow):
        self.sessions = sessions
        self.heartbeat_window = heartbeat_window
        self.registered_workers = registered_workers  # nodes known by other means, later
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("epreuve_metrics_database_up",
                               "Whether the database answered this scrape's counts")
        try:
            with self.sessions() as session:
                families = [submissions_total(session), jobs_total(session),
                            queue_jobs(session), self.workers(session),
                            *node_families(session, self.clock())]
        except SQLAlchemyError as exc:  # a scrape reports the outage instead of failing
            log.warning("metrics: the database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        yield from families
        up.add_metric([], 1)
        yield up

    def workers(self, session: Session) -> GaugeMetricFamily:
        busy = set(session.scalars(
            select(JobRow.lease_owner).distinct()
            .where(JobRow.status.in_(ON_A_NODE_JOB_STATES),  # a scorer is not a worker
                   JobRow.lease_owner.is_not(None),
                   JobRow.heartbeat_at >= self.clock() - self.heartbeat_window)))
        up = busy | set(self.registered_workers() if self.registered_workers else ())
        family = GaugeMetricFamily("epreuve_workers", "Workers up, and busy with a job",
                                   labels=["state"])
        family.add_metric(["up"], len(up))
        family.add_metric(["busy"], len(busy))
        return family


def node_families(session: Session, now: datetime) -> list[GaugeMetricFamily]:
    """Nodes by state, and each node's last heartbeat (names are validated host-name-like
    words, one per registered node: a bounded label set)."""
    by_state = GaugeMetricFamily("epreuve_nodes", "Nodes in the registry, by state",
                                 labels=["state"])
    last = GaugeMetricFamily("epreuve_node_last_heartbeat_seconds",
                             "Unix time of the node's last heartbeat or claim",
                             labels=["node", "state"])
    age = GaugeMetricFamily("epreuve_node_heartbeat_age_seconds",
                            "Seconds since the node's last heartbeat or claim",
                            labels=["node", "state"])
    counts: Counter[str] = Counter()
    newest: dict[str, NodeRow] = {}  # one series per name: the most recently heard row
    for node in session.scalars(select(NodeRow).order_by(NodeRow.last_heartbeat)):
        counts[_allowed(node.state, NODE_STATES)] += 1
        newest[node.name] = node
    for state in sorted(NODE_STATES):
        by_state.add_metric([state], counts[state])
    for name, node in sorted(newest.items()):
        if node.state == NodeState.RETIRED:  # gone for good (its older rows too): no alert
            continue
        state = _allowed(node.state, NODE_STATES)
        last.add_metric([name, state], node.last_heartbeat.timestamp())
        age.add_metric([name, state], max(0.0, (now - node.last_heartbeat).total_seconds()))
    return [by_state, last, age]


def _entered(session: Session, entity: str, row, terminal: tuple[str, ...], *extra) -> list:
    """(to_state, reason if terminal, *extra, count) over the events of `entity`, whose
    table is `row`'s."""
    reason = case((EventRow.to_state.in_(terminal), row.reason), else_=None)
    columns = (EventRow.to_state, reason, *extra)
    return session.execute(
        select(*columns, func.count())
        .join(row, row.id == EventRow.entity_id)
        .where(EventRow.entity == entity)
        .group_by(*columns)).all()


def submissions_total(session: Session) -> CounterMetricFamily:
    # every state starts at zero, so that a first increment is seen as one
    counts: Counter[tuple[str, str]] = Counter({(state, NONE): 0 for state in SUBMISSION_STATES})
    for state, reason, n in _entered(session, "submission", SubmissionRow,
                                      TERMINAL_SUBMISSION_STATES):
        counts[_allowed(state, SUBMISSION_STATES), _reason(reason)] += n
    family = CounterMetricFamily("epreuve_submissions",
                                 "Submissions that entered each state, by reason",
                                 labels=["state", "reason"])
    for labels, n in sorted(counts.items()):
        family.add_metric(labels, n)
    return family


def jobs_total(session: Session) -> CounterMetricFamily:
    counts: Counter[tuple[str, str, str]] = Counter(
        {(kind, state, NONE): 0 for kind in JOB_KINDS for state in JOB_STATES})
    for state, reason, kind, n in _entered(session, "job", JobRow, TERMINAL_JOB_STATES,
                                           JobRow.kind):
        counts[_allowed(kind, JOB_KINDS), _allowed(state, JOB_STATES), _reason(reason)] += n
    family = CounterMetricFamily("epreuve_jobs", "Jobs that entered each state, by reason",
                                 labels=["kind", "state", "reason"])
    for labels, n in sorted(counts.items()):
        family.add_metric(labels, n)
    return family


def queue_jobs(session: Session) -> GaugeMetricFamily:
    """Every phase, every queue state, zero included: a series never vanishes when empty."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for challenge, phase in session.execute(select(PhaseRow.challenge_id, PhaseRow.slug)):
        for state in QUEUE_STATES:
            counts[challenge, phase, state.value] = 0
    rows = session.execute(
        select(PhaseRow.challenge_id, PhaseRow.slug, JobRow.status, func.count())
        .select_from(JobRow).join(SubmissionRow, SubmissionRow.id == JobRow.submission_id)
        .join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id)
        .where(JobRow.status.in_(QUEUE_STATES))
        .group_by(PhaseRow.challenge_id, PhaseRow.slug, JobRow.status))
    for challenge, phase, state, n in rows:
        counts[challenge, phase, state] += n
    family = GaugeMetricFamily("epreuve_queue_jobs", "Jobs waiting or in hand, by phase",
                               labels=["challenge", "phase", "state"])
    for labels, n in sorted(counts.items()):
        family.add_metric(labels, n)
    return family


# -- job runtimes, observed when a job ends ------------------------------------------------

JOB_RUNTIME = Histogram("epreuve_job_runtime_seconds", "Wall time of jobs, by kind",
                        ["kind"], buckets=JOB_RUNTIME_BUCKETS, registry=None)


def observe_job_runtime(kind: str, seconds: float) -> None:
    """A job ended after `seconds` (its container's wall time). A time that is no time (a
    clock stepped back, nan) is not observed."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return
    if not math.isfinite(seconds) or seconds < 0:
        return
    JOB_RUNTIME.labels(_allowed(kind, JOB_KINDS)).observe(seconds)


# -- HTTP requests ---------------------------------------------------------------------------

_HTTP: WeakKeyDictionary[CollectorRegistry, tuple[CounterMetric, Histogram]] = \
    WeakKeyDictionary()
_HTTP_LOCK = threading.Lock()


def http_metrics(registry: CollectorRegistry) -> tuple[CounterMetric, Histogram]:
    """The request counter and histogram of `registry`, made once: several apps (or
    middlewares) on one registry share them."""
    with _HTTP_LOCK:
        if registry not in _HTTP:
            _HTTP[registry] = (
                CounterMetric("epreuve_http_requests", "API requests by route and status",
                              ["route", "method", "status"], registry=registry),
                Histogram("epreuve_http_request_duration_seconds",
                          "API request duration by route", ["route"], registry=registry))
        return _HTTP[registry]


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request under its route's template
    ("/submissions/{id}"), never its raw path; a path no route matched is "unmatched"."""

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests, self.duration = http_metrics(registry)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server sends if the app raises before answering
        started = time.perf_counter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope)
            method = _allowed(scope.get("method"), HTTP_METHODS)
            self.requests.labels(route, method, str(status)).inc()
            self.duration.labels(route).observe(time.perf_counter() - started)


def route_template(scope: dict) -> str:
    """The matched route's path template (Starlette and FastAPI put the route in scope)."""
    path_format = getattr(scope.get("route"), "path_format", None)
    return path_format if isinstance(path_format, str) and path_format else UNMATCHED


# -- the registry ----------------------------------------------------------------------------

def build_registry(sessions: sessionmaker[Session] | None, *,
                   gpu_samples: GPUSamples | None = None,
                   registered_workers: Callable[[], Iterable[str]] | None = None,
                   heartbeat_window: timedelta = HEARTBEAT_WINDOW) -> CollectorRegistry:
    """A registry of its own (the global one is shared by everything in the process): the
    database's counts (none without `sessions`), job runtimes, the GPUs. `RequestMetrics`
    adds the HTTP metrics to it."""
    registry = CollectorRegistry(auto_describe=False)
    if sessions is not None:
        registry.register(DatabaseCollector(sessions, heartbeat_window=heartbeat_window,
                                            registered_workers=registered_workers))
    registry.register(JOB_RUNTIME)
    registry.register(GPUCollector(gpu_samples or GPU_SAMPLES))
    return registry
