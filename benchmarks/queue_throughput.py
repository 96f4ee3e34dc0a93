"""engine.queue's lease-and-complete throughput against a plain SQL loop doing the same work.

    .venv/bin/python benchmarks/queue_throughput.py [--jobs 300] [--repeats 7] [--warmup 1]
        [--postgres postgresql+psycopg://user@host:port/db] [--quick] [--json out.json]

Each round drains the same number of queued jobs, one at a time, each in the
three transactions a worker makes: lease (pick the first queued job, take it
with a conditional UPDATE, record an event, read the row back), then
leased -> running and running -> succeeded (a conditional UPDATE guarded by the
lease owner, an event, the row read back). The engine side calls
engine.queue.lease and engine.queue.transition (SQLAlchemy ORM); the plain side
sends the same statements through the same database driver connection, with
no ORM. On PostgreSQL both pick the job `FOR UPDATE SKIP LOCKED`, as the engine
does. Jobs are queued before the clock starts; rounds alternate which side goes
first (benchmarks/harness.py).

SQLite runs on a file in a temporary directory, with the engine's pragmas
(WAL, foreign keys, busy timeout). PostgreSQL runs only when a URL is given (or
EPREUVE_BENCH_POSTGRES_URL is set), in a schema of its own that is dropped at
the end: no existing table is touched.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, delete, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks import harness
from engine import queue
from engine.db import make_engine, migrate
from engine.db.models import (
    ChallengeRow,
    EventRow,
    ImageRow,
    JobRow,
    PhaseRow,
    SubmissionRow,
    TeamRow,
    utcnow,
)

OWNER = "bench-worker"
LEASE = timedelta(seconds=60)


class Backend:
    """One database with one submission; each round refills its queue before the clock."""

    def __init__(self, url: str, jobs: int):
        self.url = url
        self.jobs = jobs
        migrate(url)
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.postgres = self.engine.dialect.name == "postgresql"
        with self.sessions() as session:
            self.submission_id = _one_submission(session)

    def refill(self) -> None:
        with self.sessions() as session:
            session.execute(delete(EventRow))
            session.execute(delete(JobRow))
            submission = session.get(SubmissionRow, self.submission_id)
            queue.enqueue(session, submission, [[f"case-{i}"] for i in range(self.jobs)],
                          kind="main", actor="bench")
            session.commit()

    def engine_side(self) -> float:
        self.refill()
        with self.sessions() as session:
            started = time.perf_counter()
            for _ in range(self.jobs):
                job = queue.lease(session, OWNER, LEASE)
                queue.transition(session, job, "running", OWNER, started_at=utcnow())
                session.commit()
                queue.transition(session, job, "succeeded", OWNER, "done",
                                 finished_at=utcnow(), lease_owner=None)
                session.commit()
            elapsed = time.perf_counter() - started
        self._check_drained()
        return elapsed

    def plain_side(self) -> float:
        self.refill()
        connection = self.engine.raw_connection()  # the same driver and pragmas, no ORM
        try:
            started = time.perf_counter()
            PlainQueue(connection, self.postgres).drain(self.jobs)
            elapsed = time.perf_counter() - started
        finally:
            connection.close()
        self._check_drained()
        return elapsed

    def _check_drained(self) -> None:
        with self.sessions() as session:
            done = session.scalar(text("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))
        if done != self.jobs:
            raise SystemExit(f"{done} of {self.jobs} jobs succeeded")


class PlainQueue:
    """The statements engine.queue sends, written by hand on a DB-API connection."""

    def __init__(self, connection, postgres: bool):
        self.connection = connection
        self.postgres = postgres
        self.mark = "%s" if postgres else "?"

    def sql(self, statement: str) -> str:
        return statement.replace("?", self.mark)

    def stamp(self, moment):
        """A datetime as the driver stores it: SQLite as SQLAlchemy's text, PostgreSQL as is."""
        return moment if self.postgres else moment.strftime("%Y-%m-%d %H:%M:%S.%f")

    def now(self):
        return self.stamp(utcnow())

    def drain(self, jobs: int) -> None:
        cursor = self.connection.cursor()
        lock = " FOR UPDATE SKIP LOCKED" if self.postgres else ""
        for _ in range(jobs):
            cursor.execute(self.sql("SELECT id FROM jobs WHERE status = 'queued' AND gpus <= ? "
                                    "ORDER BY priority, id LIMIT 1" + lock), (0,))
            job_id = cursor.fetchone()[0]
            now = utcnow()
            cursor.execute(self.sql(
                "UPDATE jobs SET status = 'leased', lease_owner = ?, lease_expires_at = ?, "
                "heartbeat_at = ?, attempts = attempts + 1 WHERE id = ? AND status = 'queued'"),
                (OWNER, self.stamp(now + LEASE), self.stamp(now), job_id))
            self.event(cursor, job_id, "queued", "leased", None)
            self.connection.commit()
            self.read_back(cursor, job_id)
            self.move(cursor, job_id, "leased", "running", "started_at = ?", (self.now(),))
            self.move(cursor, job_id, "running", "succeeded", "finished_at = ?, lease_owner = ?",
                      (self.now(), None))

    def move(self, cursor, job_id: int, from_state: str, to_state: str, assignments: str,
             values: tuple) -> None:
        cursor.execute(self.sql(f"UPDATE jobs SET status = ?, {assignments} WHERE id = ? AND "
                                "status = ? AND lease_owner = ?"),
                       (to_state, *values, job_id, from_state, OWNER))
        if cursor.rowcount != 1:
            raise SystemExit(f"job {job_id} was not {from_state} and ours")
        self.event(cursor, job_id, from_state, to_state, "done" if to_state == "succeeded"
                   else None)
        self.read_back(cursor, job_id)
        self.connection.commit()

    def event(self, cursor, job_id: int, from_state: str, to_state: str,
              detail: str | None) -> None:
        cursor.execute(self.sql("INSERT INTO events (at, entity, entity_id, from_state, "
                                "to_state, actor, detail) VALUES (?, 'job', ?, ?, ?, ?, ?)"),
                       (self.now(), job_id, from_state, to_state, OWNER, detail))

    def read_back(self, cursor, job_id: int) -> None:
        cursor.execute(self.sql("SELECT * FROM jobs WHERE id = ?"), (job_id,))
        cursor.fetchone()


def _one_submission(session: Session) -> int:
    existing = session.scalar(text("SELECT id FROM submissions LIMIT 1"))
    if existing is not None:
        return int(existing)
    challenge = ChallengeRow(id="bench", title="queue benchmark", task="segmentation",
                             definition={}, definition_sha256="0" * 64)
    phase = PhaseRow(challenge=challenge, slug="test", dataset_path="/nonexistent",
                     dataset_version="0" * 64, case_ids=[])
    image = ImageRow(image_id="sha256:" + "0" * 64, layers=[], reference="bench",
                     architecture="amd64", user="", size_bytes=0)
    submission = SubmissionRow(phase=phase, team=TeamRow(name="bench"), image=image)
    session.add(submission)
    session.commit()
    return submission.id


def postgres_schema_url(url: str, schema: str) -> str:
    """The same server and database, with every table in `schema` (search_path)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def run_backend(name: str, url: str, jobs: int, repeats: int, warmup: int) -> dict:
    backend = Backend(url, jobs)
    try:
        measurement = harness.measure({"engine.queue": backend.engine_side,
                                       "plain SQL": backend.plain_side},
                                      repeats=repeats, warmup=warmup, log=harness.progress)
    finally:
        backend.engine.dispose()
    title = f"queue, {name}, {jobs} jobs leased, started and finished one at a time"
    harness.print_rounds(measurement, title)
    harness.print_summary(measurement, title)
    rates = harness.spread([jobs / t for t in measurement.times("engine.queue")])
    plain = harness.spread([jobs / t for t in measurement.times("plain SQL")])
    print(f"\njobs per second, median (min - max): engine.queue {rates.median:.0f} "
          f"({rates.minimum:.0f} - {rates.maximum:.0f}), plain SQL {plain.median:.0f} "
          f"({plain.minimum:.0f} - {plain.maximum:.0f})")
    return {title: measurement.to_dict()}


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--jobs", type=int, default=300)
        parser.add_argument("--postgres", default=os.environ.get("EPREUVE_BENCH_POSTGRES_URL"),
                            help="a PostgreSQL URL; a schema of our own is made and dropped")

    args = harness.arguments(__doc__.splitlines()[0], repeats=7, extra=extra, argv=argv)
    jobs = 5 if args.quick else args.jobs
    env = harness.environment(docker=False)
    harness.print_environment(env)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        results.update(run_backend("SQLite (WAL, file)", f"sqlite:///{scratch}/queue.db", jobs,
                                   args.repeats, args.warmup))
    if args.postgres:
        results.update(run_postgres(args.postgres, jobs, args.repeats, args.warmup))
    else:
        print("\nPostgreSQL: skipped (no --postgres URL and no EPREUVE_BENCH_POSTGRES_URL)")
    harness.print_load()
    harness.write_json(args.json, "queue_throughput", env, results)


def run_postgres(url: str, jobs: int, repeats: int, warmup: int) -> dict:
    schema = f"queue_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        version = _server_version(admin)
        return run_backend(f"PostgreSQL {version}", postgres_schema_url(url, schema), jobs,
                           repeats, warmup)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _server_version(engine) -> str:
    with engine.connect() as connection:
        return str(connection.scalar(text("SHOW server_version"))).split()[0]


if __name__ == "__main__":
    main()
