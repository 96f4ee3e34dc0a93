"""What one /metrics scrape costs with a busy database, beside counting the jobs' rows.

    .venv/bin/python benchmarks/metrics_scrape.py [--submissions 500] [--jobs-per 11]
        [--repeats 15] [--warmup 2] [--postgres URL] [--quick] [--json out.json]

The database holds `--submissions` finished submissions of `--jobs-per` jobs each
(one smoke job and the rest main), with every event a real run writes (3 per
submission, 5 per job), plus a queue of 20 waiting jobs. "scrape" is everything
engine.metrics reports, turned into Prometheus text (build_registry, once; then
generate_latest per round): transitions counted from the events, the queue by
phase, the workers. "rows by state" is the one GROUP BY over the jobs table that
a collector counting current states would send: the floor any database-backed
scrape pays. The ratio is the price of counters that never go down.

SQLite runs on a file in a temporary directory; PostgreSQL only with a URL (or
EPREUVE_BENCH_POSTGRES_URL), in a schema of its own that is dropped at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.orm import sessionmaker

from benchmarks import harness
from benchmarks.queue_throughput import postgres_schema_url
from engine import metrics
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

JOB_PATH = ("queued", "leased", "running", "scoring", "succeeded")
WAITING = 20


def fill(sessions, submissions: int, jobs_per: int) -> int:
    """Finished submissions with their jobs and events, inserted in bulk; returns events."""
    now = utcnow()
    with sessions() as session:
        challenge = ChallengeRow(id="bench", title="metrics benchmark", task="segmentation",
                                 definition={}, definition_sha256="0" * 64)
        phase = PhaseRow(challenge=challenge, slug="final", dataset_path="/nonexistent",
                         dataset_version="0" * 64, case_ids=[])
        image = ImageRow(image_id="sha256:" + "0" * 64, layers=[], reference="bench",
                         architecture="amd64", user="1000:1000", size_bytes=0)
        session.add_all([phase, image])
        session.flush()
        session.execute(insert(TeamRow), [{"name": f"team-{i}"} for i in range(submissions)])
        teams = session.scalars(text("SELECT id FROM teams ORDER BY id")).all()
        session.execute(insert(SubmissionRow), [
            {"phase_id": phase.id, "team_id": team, "image_pk": image.id,
             "status": "succeeded", "created_at": now, "finished_at": now} for team in teams])
        ids = session.scalars(text("SELECT id FROM submissions ORDER BY id")).all()
        jobs = [{"submission_id": s, "kind": "smoke" if j == 0 else "main", "case_ids": [],
                 "status": "succeeded", "created_at": now}
                for s in ids for j in range(jobs_per)]
        jobs += [{"submission_id": ids[0], "kind": "main", "case_ids": [], "status": "queued",
                  "created_at": now} for _ in range(WAITING)]
        session.execute(insert(JobRow), jobs)
        job_rows = session.execute(text("SELECT id, status FROM jobs")).all()
        events = [{"at": now, "entity": "submission", "entity_id": s, "from_state": a,
                   "to_state": b, "actor": "bench"}
                  for s in ids for a, b in ((None, "queued"), ("queued", "running"),
                                            ("running", "succeeded"))]
        for job_id, status in job_rows:
            path = JOB_PATH if status == "succeeded" else JOB_PATH[:1]
            events += [{"at": now, "entity": "job", "entity_id": job_id, "from_state": a,
                        "to_state": b, "actor": "bench"}
                       for a, b in zip((None, *path), path, strict=False)]
        session.execute(insert(EventRow), events)
        session.commit()
        return len(events)


def run_backend(name: str, url: str, submissions: int, jobs_per: int, repeats: int,
                warmup: int) -> dict:
    migrate(url)
    engine = make_engine(url)
    try:
        sessions = sessionmaker(engine, expire_on_commit=False)
        events = fill(sessions, submissions, jobs_per)
        registry = metrics.build_registry(sessions, gpu_samples=metrics.GPUSamples())
        text_ = generate_latest(registry).decode()
        expected = f'epreuve_jobs_total{{kind="main",reason="none",state="queued"}} ' \
                   f"{float(submissions * (jobs_per - 1) + WAITING)}"
        if expected not in text_:  # a benchmark of wrong numbers measures nothing
            raise SystemExit(f"the scrape does not count the jobs: {expected!r} missing")

        def rows_by_state() -> None:
            with sessions() as session:
                session.execute(text("SELECT status, reason, count(*) FROM jobs "
                                     "GROUP BY status, reason")).all()

        measurement = harness.measure(
            {"scrape": harness.timed(lambda: generate_latest(registry)),
             "rows by state": harness.timed(rows_by_state)},
            repeats=repeats, warmup=warmup, log=harness.progress)
    finally:
        engine.dispose()
    title = (f"/metrics, {name}, {submissions} submissions x {jobs_per} jobs, "
             f"{events} events, {len(text_)} bytes of text")
    harness.print_rounds(measurement, title)
    harness.print_summary(measurement, title)
    return {title: measurement.to_dict()}


def run_postgres(url: str, submissions: int, jobs_per: int, repeats: int, warmup: int) -> dict:
    schema = f"metrics_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        return run_backend("PostgreSQL", postgres_schema_url(url, schema), submissions,
                           jobs_per, repeats, warmup)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--submissions", type=int, default=500)
        parser.add_argument("--jobs-per", type=int, default=11)
        parser.add_argument("--postgres", default=os.environ.get("EPREUVE_BENCH_POSTGRES_URL"),
                            help="a PostgreSQL URL; a schema of our own is made and dropped")

    args = harness.arguments(__doc__.splitlines()[0], repeats=15, warmup=2, extra=extra,
                             argv=argv)
    submissions, jobs_per = (5, 3) if args.quick else (args.submissions, args.jobs_per)
    env = harness.environment(docker=False)
    harness.print_environment(env)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        results.update(run_backend("SQLite (WAL, file)", f"sqlite:///{scratch}/metrics.db",
                                   submissions, jobs_per, args.repeats, args.warmup))
    if args.postgres:
        results.update(run_postgres(args.postgres, submissions, jobs_per, args.repeats,
                                    args.warmup))
    else:
        print("\nPostgreSQL: skipped (no --postgres URL and no EPREUVE_BENCH_POSTGRES_URL)")
    harness.print_load()
    harness.write_json(args.json, "metrics_scrape", env, results)


if __name__ == "__main__":
    main()
