"""The job queue over HTTP: remote workers claim, start and complete jobs on PostgreSQL.

    .venv/bin/python benchmarks/queue_over_http.py [--jobs 10000] [--workers 16] [--backlog 2000]
        [--teams 8] [--cases 10] [--postgres postgresql+psycopg://user@host:port/db]
        [--quick] [--json out.json]

The database (PostgreSQL, in a schema of its own made and dropped here: no existing
table is touched; the URL from --postgres or EPREUVE_BENCH_POSTGRES_URL) holds one
challenge whose phase has `--cases` small sealed synthetic cases, and `--jobs` queued
main jobs of one case each, in submissions of `--cases` jobs:
- a backlog team queues `--backlog` jobs first;
- a small team then queues one job (its team id is the highest: no tie goes its way);
- `--teams` other teams queue the rest.
Under the old FIFO order the small team's job ran `backlog + 1`-th (2,001st).

The server is uvicorn in its own process serving engine.api.create_app (rate limits out
of the way). `--workers` threads each play a remote node through the real worker routes
with raw httpx: claim (long poll), start, complete. The completion reports a successful
run with no outputs uploaded, so scoring is trivial (every case missing): what is
measured is the queue and its fence, not a container.

Printed: claim latency p50 and p99 (claims that got a job), jobs per second (completed
jobs over the wall time of the run), double runs (completions the server accepted more
than once for a job, case results beyond one per case; goal zero), and the fairness
figure: the place at which the small team's first job was leased, beside the FIFO figure
and beside what queue.position predicted before the run. --quick: 40 jobs, 4 workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script, this file would shadow the standard `queue`
    sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import httpx  # noqa: E402
from sqlalchemy import create_engine, func, insert, select, text  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.queue_throughput import postgres_schema_url  # noqa: E402

CHALLENGE, PHASE = "queue-bench", "validation"
API = "/api/v1/worker"
CHALLENGE_YAML = f"""
id: {CHALLENGE}
title: Queue benchmark
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2]}}
metrics: {{labels: [1, 2], nsd_tolerance_mm: 4.0}}
ranking:
  scheme: rank-then-aggregate
  metrics: [{{metric: dice, label: 1}}]
phases:
  - id: {PHASE}
    dataset: {{path: data}}
    visibility: {{logs: true, per_case: true}}
"""


# -- the server (python -m uvicorn --factory benchmarks.queue_over_http:bench_app) -------


def bench_app():
    """The API as `epreuve serve` builds it, rate limits out of the way."""
    from engine.api.app import ApiOptions, create_app
    from engine.api.ratelimit import Rate
    from engine.config import load_settings

    return create_app(load_settings(), ApiOptions(rate=Rate(burst=1_000_000_000,
                                                            per_second=1e9)))


# -- the database ----------------------------------------------------------------------------


@dataclass
class Filled:
    worker_token: str
    small_job: int
    small_submission: int
    fifo_place: int  # where the small team's job stood in the old (priority, id) order
    predicted_place: int  # where queue.position put it before the run


def plan_teams(jobs: int, backlog: int, teams: int) -> list[tuple[str, int]]:
    """[(team name, jobs)] in the order they queue: the backlog, the small team, the rest."""
    others = max(jobs - backlog - 1, 0)
    share, extra = divmod(others, teams)
    rest = [(f"team-{i:02d}", share + (i < extra)) for i in range(teams)]
    return [("backlog", backlog), ("small", 1), *[(n, k) for n, k in rest if k]]


def fill(root: Path, database_url: str, jobs: int, backlog: int, teams: int,
         cases: int) -> Filled:
    from engine import queue as engine_queue
    from engine.datasets import seal
    from engine.db import session_factory
    from engine.db.models import ImageRow, JobRow, SubmissionRow, TeamRow
    from engine.submissions import find_phase, register_challenge
    from engine.synthetic import synth_dataset
    from engine.tokens import create_token

    synth_dataset(root / "data", cases=cases, seed=7, size=16)
    seal(root / "data")
    (root / "challenge.yaml").write_text(CHALLENGE_YAML)
    sessions = session_factory(database_url)
    layout = plan_teams(jobs, backlog, teams)
    with sessions() as session:
        register_challenge(session, root / "challenge.yaml")
        phase = find_phase(session, CHALLENGE, PHASE)[0]
        image = ImageRow(image_id="sha256:" + "c" * 64, tar_sha256="d" * 64, layers=[],
                         reference="bench/algorithm:1", architecture="amd64", user="1000",
                         size_bytes=1 << 20)
        session.add(image)
        # the small team is made last: ties between unserved teams go by team id
        made = {name: TeamRow(name=name) for name, _ in layout if name != "small"}
        made["small"] = TeamRow(name="small")
        for team in made.values():
            session.add(team)
            session.flush()
        for name, count in layout:
            while count > 0:
                take = min(count, cases)
                submission = SubmissionRow(phase=phase, team=made[name], image=image,
                                           dataset_version=phase.dataset_version,
                                           case_ids=list(phase.case_ids))
                session.add(submission)
                session.flush()
                session.execute(insert(JobRow), [
                    {"submission_id": submission.id, "kind": "main", "case_ids": [case_id],
                     "dataset_version": phase.dataset_version,
                     "priority": engine_queue.MAIN_PRIORITY}
                    for case_id in phase.case_ids[:take]])
                count -= take
        small = session.scalar(select(SubmissionRow).join(TeamRow).where(TeamRow.name == "small"))
        small_job = session.scalar(select(JobRow.id).where(JobRow.submission_id == small.id))
        fifo = session.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.status == "queued", JobRow.id < small_job)) + 1
        predicted = engine_queue.position(session, small) + 1
        _, secret = create_token(session, "worker")
        session.commit()
    sessions.kw["bind"].dispose()
    return Filled(secret, small_job, small.id, fifo, predicted)


# -- the load --------------------------------------------------------------------------------


@dataclass
class Tally:
    claims: list[float] = field(default_factory=list)  # seconds, claims that got a job
    accepted: Counter = field(default_factory=Counter)  # job id -> completions accepted
    completed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def succeeded() -> dict:
    from runners.base import RunResult, RunStatus

    return RunResult(status=RunStatus.SUCCEEDED, reason=None, message="succeeded",
                     exit_code=0, wall_seconds=0.1, output_files=0).to_dict()


def node(url: str, token: str, tally: Tally, total: int) -> None:
    """One remote worker: claim, start, complete, until every job is done."""
    from engine.worker.wire import ATTEMPT_HEADER, ATTEMPT_TOKEN_HEADER

    result = succeeded()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=120) as http:
        while True:
            began = time.perf_counter()
            claimed = http.post(f"{API}/jobs/claim", json={"gpus": 0, "wait_seconds": 1})
            took = time.perf_counter() - began
            if claimed.status_code == 204:
                with tally.lock:
                    if tally.completed >= total:
                        return
                continue
            claimed.raise_for_status()
            body = claimed.json()
            job_id, attempt = body["ticket"]["job_id"], body["ticket"]["attempt"]
            fence = {ATTEMPT_HEADER: str(attempt), ATTEMPT_TOKEN_HEADER: body["attempt_token"]}
            http.post(f"{API}/jobs/{job_id}/start", headers=fence).raise_for_status()
            done = http.post(f"{API}/jobs/{job_id}/complete", headers=fence,
                             json={"result": result, "gpu_usage": {}})
            done.raise_for_status()
            with tally.lock:
                tally.claims.append(took)
                if not done.json()["repeated"]:
                    tally.accepted[job_id] += 1
                    tally.completed += 1


def run_load(url: str, token: str, jobs: int, workers: int) -> tuple[Tally, float]:
    tally = Tally()
    threads = [threading.Thread(target=node, args=(url, token, tally, jobs), daemon=True)
               for _ in range(workers)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.perf_counter() - began


# -- what happened, from the database -----------------------------------------------------------


def observed(database_url: str, small_job: int) -> dict[str, int]:
    from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow, TeamRow

    engine = create_engine(database_url)
    with engine.connect() as connection:
        leased = connection.execute(
            select(EventRow.entity_id, TeamRow.name)
            .join(JobRow, JobRow.id == EventRow.entity_id).join(SubmissionRow).join(TeamRow)
            .where(EventRow.entity == "job", EventRow.to_state == "leased")
            .order_by(EventRow.id)).all()
        leases = [job_id for job_id, _ in leased]
        rows = connection.scalar(select(func.count()).select_from(CaseResultRow))
        distinct = connection.scalar(select(func.count()).select_from(
            select(CaseResultRow.submission_id, CaseResultRow.case_id).distinct().subquery()))
    engine.dispose()
    place = leases.index(small_job) + 1
    return {"small_place": place, "leases": len(leases),
            "backlog_before_small": sum(team == "backlog" for _, team in leased[:place - 1]),
            "case_results": rows, "extra_case_results": rows - distinct,
            "re_leased": len(leases) - len(set(leases))}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(args, filled: Filled, tally: Tally, wall: float, seen: dict) -> dict:
    twice = sum(1 for n in tally.accepted.values() if n > 1)
    figures = {
        "claim_p50_ms": 1000 * statistics.median(tally.claims),
        "claim_p99_ms": 1000 * percentile(tally.claims, 99),
        "jobs_per_second": tally.completed / wall,
        "completed": tally.completed,
        "double_runs": twice + seen["extra_case_results"],
        "re_leased": seen["re_leased"],
        "small_team_place": seen["small_place"],
        "backlog_jobs_before_small": seen["backlog_before_small"],
        "small_team_predicted": filled.predicted_place,
        "fifo_place": filled.fifo_place,
    }
    print(f"\n## Queue over HTTP: {args.jobs} jobs, {args.workers} workers, PostgreSQL "
          f"(backlog {args.backlog} jobs, {args.teams} other teams, {args.cases} cases per "
          "submission)\n")
    print(f"claim latency p50            {figures['claim_p50_ms']:.1f} ms")
    print(f"claim latency p99            {figures['claim_p99_ms']:.1f} ms")
    print(f"jobs per second              {figures['jobs_per_second']:.1f} "
          f"({tally.completed} jobs in {wall:.1f} s)")
    print(f"double runs                  {figures['double_runs']} (completions accepted twice: "
          f"{twice}; case results beyond one per case: {seen['extra_case_results']}; "
          f"re-leased jobs: {seen['re_leased']})")
    print(f"small team's first job leased at place {seen['small_place']} (queue.position "
          f"predicted {filled.predicted_place}; the old FIFO order: {filled.fifo_place}); "
          f"the backlog team's jobs leased before it: {seen['backlog_before_small']} "
          f"(at most the {args.workers} slots)")
    return figures


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--jobs", type=int, default=10_000)
        parser.add_argument("--workers", type=int, default=16)
        parser.add_argument("--backlog", type=int, default=2000,
                            help="jobs the backlog team queues first")
        parser.add_argument("--teams", type=int, default=8, help="other teams")
        parser.add_argument("--cases", type=int, default=10, help="cases (jobs) per submission")
        parser.add_argument("--postgres", default=os.environ.get("EPREUVE_BENCH_POSTGRES_URL"),
                            help="a PostgreSQL URL; a schema of our own is made and dropped")

    args = harness.arguments(__doc__.splitlines()[0], repeats=1, warmup=0, extra=extra,
                             argv=argv)
    if args.quick:
        args.jobs, args.workers, args.backlog, args.teams, args.cases = 40, 4, 20, 3, 5
    if not args.postgres:
        raise SystemExit("a PostgreSQL URL is needed: --postgres or EPREUVE_BENCH_POSTGRES_URL")
    env = harness.environment(docker=False)
    harness.print_environment(env)
    schema = f"queue_http_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        figures = run(args, postgres_schema_url(args.postgres, schema))
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    harness.print_load()
    harness.write_json(args.json, "queue", env, {"queue over HTTP": figures})


def run(args, database_url: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as scratch:
        root = Path(scratch)
        harness.progress(f"queueing {args.jobs} jobs")
        filled = fill(root, database_url, args.jobs, args.backlog, args.teams, args.cases)
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("EPREUVE_")}
        server_env.update(EPREUVE_DATA_DIR=str(root / "state"),
                          EPREUVE_DATABASE_URL=database_url)
        server, url = harness.start_uvicorn("benchmarks.queue_over_http:bench_app", root,
                                            server_env)
        try:
            harness.progress(f"{args.workers} workers draining the queue over HTTP")
            tally, wall = run_load(url, filled.worker_token, args.jobs, args.workers)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        return report(args, filled, tally, wall, observed(database_url, filled.small_job))


if __name__ == "__main__":
    main()
