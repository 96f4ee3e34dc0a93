"""Leaderboard and status reads under concurrent clients, beside static responses of the same
sizes from the same server.

    .venv/bin/python benchmarks/api.py [--submissions 500] [--cases 100] [--clients 50]
        [--requests-per-client 10] [--leaderboard-every 50] [--repeats 3] [--warmup 1]
        [--quick] [--json out.json]

The database (SQLite, a file in a temporary directory) holds one challenge whose phase has
`--cases` sealed synthetic cases and `--submissions` finished submissions, one per team,
each with a job, a result row per case and its aggregates, inserted in bulk through the
models (as the worker would leave them, without running a container). The server is
uvicorn in its own process serving engine.api.create_app (rate limits raised out of the
way) plus one route of this benchmark only, /bench/static/{size}, answering `size` bytes
held in memory, through the same middlewares.

Each round, `--clients` threads (one httpx client and connection each) send
`--requests-per-client` requests each: one request in `--leaderboard-every` of the round
is a leaderboard page (GET .../leaderboard: 50 entries, computed over every team's
per-case results), spread over the clients; the others the status of a random submission
(GET /api/v1/submissions/{id}/status); all as an organiser of the challenge.
"static" sends the same sequence to /bench/static/{size}, each request the size of the API
answer it stands for. Printed: the rounds (harness: wall time of a whole round), the
latencies' p50 and p99 of each side by kind, and the per-round ratio of the p99s, API /
static (goal: at most 3). --quick: 20 submissions x 10 cases, 5 clients.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from fastapi import Response
from sqlalchemy import insert, select

from benchmarks import harness

REPO = Path(__file__).resolve().parent.parent
CHALLENGE, PHASE = "api-bench", "validation"
CHALLENGE_YAML = f"""
id: {CHALLENGE}
title: API benchmark
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2]}}
metrics: {{labels: [1, 2], nsd_tolerance_mm: 4.0}}
ranking:
  scheme: rank-then-aggregate
  metrics: [{{metric: dice, label: 1}}, {{metric: hd95, label: 1}}]
phases:
  - id: {PHASE}
    dataset: {{path: data}}
    visibility: {{logs: true, per_case: true}}
"""


# -- the server (a uvicorn factory: python -m uvicorn --factory benchmarks.api:bench_app) -----


def bench_app():
    """The API as `epreuve serve` builds it, rate limits out of the way, plus a static
    route answering `size` bytes from memory."""
    from engine.api.app import ApiOptions, create_app
    from engine.api.ratelimit import Rate
    from engine.config import load_settings

    app = create_app(load_settings(),
                     ApiOptions(rate=Rate(burst=1_000_000_000, per_second=1e9)))

    @lru_cache(maxsize=64)
    def body(size: int) -> bytes:
        return b"[" + b" " * max(size - 2, 0) + b"]"

    def static(size: int) -> Response:
        return Response(body(min(size, 1 << 24)), media_type="application/json")

    app.add_api_route("/bench/static/{size}", static, methods=["GET"])
    return app


def start_server(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """uvicorn in its own process, on a free loopback port, serving bench_app."""
    return harness.start_uvicorn("benchmarks.api:bench_app", root, env)


# -- the database ----------------------------------------------------------------------------


def fill(root: Path, database_url: str, submissions: int, cases: int) -> tuple[list[int], str]:
    """A sealed dataset, the challenge, `submissions` finished submissions (one per team)
    with a job, per-case results and aggregates; returns their ids and an organiser token."""
    from engine.challenges import challenge_definition, metric_keys
    from engine.datasets import seal
    from engine.db import session_factory
    from engine.db.models import (
        AggregateRow,
        CaseResultRow,
        ImageRow,
        JobRow,
        SubmissionRow,
        TeamRow,
        utcnow,
    )
    from engine.scoring.aggregation import summarise
    from engine.submissions import find_phase, register_challenge
    from engine.synthetic import synth_dataset
    from engine.tokens import create_token

    synth_dataset(root / "data", cases=cases, seed=7, size=16)
    seal(root / "data")
    (root / "challenge.yaml").write_text(CHALLENGE_YAML)
    rng = random.Random(11)
    sessions = session_factory(database_url)
    with sessions() as session:
        register_challenge(session, root / "challenge.yaml")
        phase = find_phase(session, CHALLENGE, PHASE)[0]
        keys = metric_keys(challenge_definition(phase.challenge))
        image = ImageRow(image_id="sha256:" + "c" * 64, tar_sha256="d" * 64, layers=[],
                         reference="bench/algorithm:1", architecture="amd64", user="1000",
                         size_bytes=1 << 20)
        session.add(image)
        session.flush()
        now = utcnow()
        session.execute(insert(TeamRow), [{"name": f"team-{i:04d}"} for i in range(submissions)])
        teams = session.scalars(select(TeamRow.id).order_by(TeamRow.id)).all()
        session.execute(insert(SubmissionRow), [
            {"phase_id": phase.id, "team_id": team, "image_pk": image.id,
             "status": "succeeded", "message": "evaluated", "dataset_version":
             phase.dataset_version, "case_ids": list(phase.case_ids), "created_at": now,
             "finished_at": now} for team in teams])
        ids = session.scalars(select(SubmissionRow.id).order_by(SubmissionRow.id)).all()
        session.execute(insert(JobRow), [
            {"submission_id": s, "kind": "main", "case_ids": list(phase.case_ids),
             "status": "succeeded", "attempts": 1, "created_at": now, "started_at": now,
             "finished_at": now, "run_result": {"log_tail": "done\n", "log_truncated": False,
                                                "wall_seconds": 5.0, "cpu_seconds": 4.0,
                                                "peak_memory_bytes": 1 << 20}}
            for s in ids])
        jobs = dict(session.execute(select(JobRow.submission_id, JobRow.id)).all())
        values = {s: {key: [rng.random() for _ in phase.case_ids] for key in keys}
                  for s in ids}
        session.execute(insert(CaseResultRow), [
            {"submission_id": s, "job_id": jobs[s], "case_id": case_id, "valid": True,
             "metrics": {key: values[s][key][index] for key in keys},
             "runtime_seconds": 1.0 + rng.random(), "runtime_exact": True,
             "output_sha256": {}, "created_at": now}
            for s in ids for index, case_id in enumerate(phase.case_ids)])
        session.execute(insert(AggregateRow), [
            {"submission_id": s, "metric": key,
             "summary": {**summarise(values[s][key], worst=values[s][key],
                                     bootstrap=0).to_dict(), "n_failed": 0}}
            for s in ids for key in keys])
        _, secret = create_token(session, "organiser", challenges=[CHALLENGE])
        session.commit()
    sessions.kw["bind"].dispose()
    return list(ids), secret


# -- the load --------------------------------------------------------------------------------


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def plan(submission_ids: list[int], clients: int, per_client: int, every: int,
         seed: int) -> list[list[tuple[str, str]]]:
    """Each client's requests, as (kind, API path): the same plan for both sides. Request
    i of the whole round (client i // per_client) is a leaderboard when i % every == 0."""
    rng = random.Random(seed)
    board = f"/api/v1/challenges/{CHALLENGE}/phases/{PHASE}/leaderboard"
    requests = [("leaderboard", board) if index % every == 0 else
                ("status", f"/api/v1/submissions/{rng.choice(submission_ids)}/status")
                for index in range(clients * per_client)]
    return [requests[k * per_client:(k + 1) * per_client] for k in range(clients)]


class Load:
    """Runs the plan with one thread and one connection per client; keeps each latency."""

    def __init__(self, url: str, token: str, plans: list[list[tuple[str, str]]],
                 sizes: dict[str, int]):
        self.url, self.token, self.plans, self.sizes = url, token, plans, sizes
        self.latencies: dict[str, list[dict[str, list[float]]]] = {"API": [], "static": []}
        self.log: Path | None = None  # the server's log, shown when requests fail

    def path(self, side: str, kind: str, path: str) -> str:
        return path if side == "API" else f"/bench/static/{self.sizes[kind]}"

    def contender(self, side: str) -> Callable[[], float]:
        def run() -> float:
            recorded: dict[str, list[float]] = {"leaderboard": [], "status": []}
            lock, errors = threading.Lock(), []
            clients = [httpx.Client(base_url=self.url, timeout=600, headers={
                "Authorization": f"Bearer {self.token}"}) for _ in self.plans]
            for client in clients:  # connect first: the round times requests, not handshakes
                client.get("/healthz").raise_for_status()
            start = threading.Barrier(len(self.plans) + 1)

            def client_loop(client: httpx.Client, requests: list[tuple[str, str]]) -> None:
                start.wait()
                for kind, path in requests:
                    began = time.perf_counter()
                    try:
                        response = client.get(self.path(side, kind, path))
                    except httpx.TransportError as exc:
                        errors.append(f"{path}: no answer ({exc!r})")
                        continue
                    spent = time.perf_counter() - began
                    if response.status_code != 200:
                        errors.append(f"{path}: {response.status_code} {response.text[:200]}")
                    with lock:
                        recorded[kind].append(spent)

            threads = [threading.Thread(target=client_loop, args=(client, requests))
                       for client, requests in zip(clients, self.plans, strict=True)]
            for thread in threads:
                thread.start()
            start.wait()
            began = time.perf_counter()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - began
            for client in clients:
                client.close()
            if errors:
                log = (self.log.read_text()[-3000:] if self.log and self.log.exists() else "")
                raise SystemExit(f"{side}: {len(errors)} of {sum(map(len, self.plans))} "
                                 f"requests failed, first: {errors[0]}\n"
                                 f"the server's log ends with:\n{log}")
            self.latencies[side].append(recorded)
            return seconds
        return run


def response_sizes(url: str, token: str, submission_id: int) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {token}"}
    board = httpx.get(f"{url}/api/v1/challenges/{CHALLENGE}/phases/{PHASE}/leaderboard",
                      headers=headers, timeout=600)
    status = httpx.get(f"{url}/api/v1/submissions/{submission_id}/status", headers=headers,
                       timeout=60)
    for response in (board, status):
        response.raise_for_status()
    if len(board.json()["items"]) == 0:
        raise SystemExit("the leaderboard is empty: a benchmark of nothing")
    return {"leaderboard": len(board.content), "status": len(status.content)}


def print_latencies(load: Load, sizes: dict[str, int]) -> dict:
    """p50 and p99 by side and kind (every round pooled), then the per-round p99 ratio."""
    print("\nlatency of one request, every round pooled\n")
    print("| requests | bytes | API p50 | API p99 | static p50 | static p99 | p99 API / static |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for kind in ("leaderboard", "status", "all"):
        row = {}
        for side in ("API", "static"):
            pooled = [t for rnd in load.latencies[side] for k, times in rnd.items()
                      for t in times if kind in ("all", k)]
            row[side] = (percentile(pooled, 50), percentile(pooled, 99), len(pooled))
        ratio = row["API"][1] / row["static"][1]
        summary[kind] = {"api_p50": row["API"][0], "api_p99": row["API"][1],
                         "static_p50": row["static"][0], "static_p99": row["static"][1],
                         "requests": row["API"][2], "p99_ratio": ratio}
        print(f"| {kind} ({row['API'][2]}) | {sizes.get(kind, '-')} | "
              f"{harness.seconds(row['API'][0])} | {harness.seconds(row['API'][1])} | "
              f"{harness.seconds(row['static'][0])} | {harness.seconds(row['static'][1])} | "
              f"{ratio:.2f} |")
    ratios = []
    for api_round, static_round in zip(load.latencies["API"], load.latencies["static"],
                                       strict=True):
        api = [t for times in api_round.values() for t in times]
        static = [t for times in static_round.values() for t in times]
        ratios.append(percentile(api, 99) / percentile(static, 99))
    s = harness.spread(ratios)
    print(f"\np99 ratio API / static, all requests, per round (goal <= 3): median "
          f"{s.median:.2f}, min - max {s.minimum:.2f} - {s.maximum:.2f} ({s.n} rounds)")
    summary["p99_ratio_per_round"] = ratios
    return summary


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--submissions", type=int, default=500)
        parser.add_argument("--cases", type=int, default=100)
        parser.add_argument("--clients", type=int, default=50)
        parser.add_argument("--requests-per-client", type=int, default=10)
        parser.add_argument("--leaderboard-every", type=int, default=50,
                            help="one request in this many is a leaderboard page")

    args = harness.arguments(__doc__.splitlines()[0], repeats=3, warmup=1, extra=extra,
                             argv=argv)
    if args.quick:
        args.submissions, args.cases, args.clients, args.requests_per_client = 20, 10, 5, 5
        args.leaderboard_every = 5
    env = harness.environment(docker=False)
    harness.print_environment(env)
    with tempfile.TemporaryDirectory(prefix="api-bench-") as scratch:
        root = Path(scratch)
        database_url = f"sqlite:///{root / 'state' / 'epreuve.db'}"
        harness.progress(f"filling {args.submissions} submissions x {args.cases} cases")
        ids, token = fill(root, database_url, args.submissions, args.cases)
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("EPREUVE_")}
        server_env.update(EPREUVE_DATA_DIR=str(root / "state"),
                          EPREUVE_DATABASE_URL=database_url)
        server, url = start_server(root, server_env)
        try:
            sizes = response_sizes(url, token, ids[0])
            load = Load(url, token, plan(ids, args.clients, args.requests_per_client,
                                         args.leaderboard_every, seed=5), sizes)
            load.log = root / "server.log"
            measurement = harness.measure({"API": load.contender("API"),
                                           "static": load.contender("static")},
                                          repeats=args.repeats, warmup=args.warmup,
                                          log=harness.progress)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    load.latencies = {side: rounds[args.warmup:] for side, rounds in load.latencies.items()}
    title = (f"API reads, {args.submissions} submissions x {args.cases} cases, "
             f"{args.clients} clients x {args.requests_per_client} requests "
             f"(1 in {args.leaderboard_every} a leaderboard)")
    harness.print_rounds(measurement, f"{title}, wall time of a round")
    harness.print_summary(measurement, f"{title}, wall time of a round")
    latencies = print_latencies(load, sizes)
    harness.print_load()
    harness.write_json(args.json, "api", env, {title: {
        **measurement.to_dict(), "sizes": sizes, "latency": latencies,
        "latencies": load.latencies}})


if __name__ == "__main__":
    main()
