"""The engine's end-to-end overhead against a bare loop doing the same runs and scoring,
the same work through a server and one remote worker, and how busy a node's slots stay.

    .venv/bin/python benchmarks/throughput.py [--submissions 2] [--cases 5] [--repeats 9]
                                              [--warmup 1] [--quick] [--json out.json]
                                              [--slots 2] [--run-seconds 3]

Engine: N submissions (the threshold example, one distinct image each) x M
cases through the whole pipeline: intake (tar checks, pinning), queue, smoke
job, shards of one case, seal verification, staging, the hardened runner,
output validation, scoring, results, aggregates. One container per case: N x M.
Bare loop: for the same images and cases, `docker save`, then per case stage
the inputs, create/start/wait/remove one container through the Docker API,
score with the same function, nothing else. N x M containers too.

Both sides give their containers the same settings: memory and memory+swap
1 GiB, 1 CPU, no network (NetworkMode=none and NetworkDisabled=true), the same
user (the image's, as the runner resolves it), /input read-only, /output
writable. Each round starts from a fresh database and state directory (made
before the clock starts); rounds alternate which side goes first
(benchmarks/harness.py).

Server + remote worker: the same submissions, registered the same way, run by a
RemoteAgent (HttpCoordinator: claim, inputs by manifest, outputs uploaded, the
server scores) against `epreuve serve`'s API in its own process on loopback
(started, with its database and a worker token, before the clock). Its ratio
(engine / remote) is the remote node's throughput against the local worker's:
goal at least 0.9.

Slot busy fraction: one node with `--slots` CPU slots runs jobs whose container
sleeps `--run-seconds` before segmenting, and whose scoring takes as long as the
run did (the coordinator sleeps the run's wall time before scoring). While the
queue holds work, the share of wall time each slot has a container running:
from the first container's start to the last one's (the queue is empty after),
leaving out the spans when a slot was free and nothing was queued (the smoke
job's report queues a submission's shards). Goal at least 0.95.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker
from docker.types import Mount

from benchmarks import harness
from engine.config import Settings
from engine.datasets import load, seal, stage, unstage
from engine.db import session_factory
from engine.images import pin_tar
from engine.scoring.cases import CasePair, score_cases
from engine.scoring.segmentation import SegmentationSettings
from engine.store import open_store
from engine.submissions import register_challenge, submit
from engine.synthetic import synth_dataset
from engine.tokens import create_token
from engine.worker import Worker
from engine.worker.http import HttpCoordinator, RemoteAgent
from engine.worker.slots import busy_fractions
from runners.docker import DockerRunner, effective_user

REPO = Path(__file__).resolve().parent.parent
IMAGE = "epreuve-example/threshold:latest"
MEMORY_BYTES = 1 << 30
CPUS = 1
CHALLENGE = f"""
id: bench
title: Throughput benchmark
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}}
metrics: {{labels: [1, 2], nsd_tolerance_mm: 4.0}}
ranking: {{metrics: [{{metric: dice, label: 1}}]}}
phases:
  - id: test
    dataset: {{path: data}}
    quota: {{submissions: 1000, per: 1d}}
    cases_per_run: 1
    limits: {{memory: 1g, cpus: {CPUS}, time_per_case: 120s}}
"""
SETTINGS = SegmentationSettings(labels=(1, 2), nsd_tolerance_mm=4.0)


class Bench:
    """The shared inputs of every round: images, the sealed dataset, a scratch directory."""

    def __init__(self, root: Path, tags: list[str]):
        self.root = root
        self.tags = tags
        self.client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
        self.dataset = load(root / "data")
        self.rounds = 0
        (root / "bench.yaml").write_text(CHALLENGE)

    def fresh(self, side: str) -> Path:
        self.rounds += 1
        directory = self.root / f"{side}-{self.rounds}"
        directory.mkdir()
        return directory

    def engine(self) -> float:
        work = self.fresh("engine")
        settings = server_settings(work)
        sessions = session_factory(settings.database_url)  # migrations: before the clock
        worker = Worker(sessions, settings, DockerRunner(state_dir=settings.state_dir / "runs"),
                        scoring_workers=1)
        started = time.perf_counter()
        self.submit_all(work, settings, sessions)
        jobs = worker.run(until_idle=True)
        elapsed = time.perf_counter() - started
        self.check(jobs)
        shutil.rmtree(work, ignore_errors=True)
        return elapsed

    def remote(self) -> float:
        """The same, through `epreuve serve`'s API and one RemoteAgent on this machine."""
        work = self.fresh("remote")
        settings = server_settings(work)
        sessions = session_factory(settings.database_url)
        with sessions() as session:
            _, token = create_token(session, "worker")
            session.commit()
        server, url = harness.start_uvicorn("benchmarks.api:bench_app", work,
                                            server_environment(settings))
        node = Settings(data_dir=work / "node", database_url="sqlite://",
                        state_dir=work / "node" / "runner")
        coordinator = HttpCoordinator(url, token, wait_seconds=0.2)
        try:
            agent = RemoteAgent(coordinator, DockerRunner(state_dir=node.state_dir / "runs"),
                                node)
            started = time.perf_counter()
            self.submit_all(work, settings, sessions)
            jobs = agent.run(until_idle=True)
            elapsed = time.perf_counter() - started
        finally:
            coordinator.close()
            server.terminate()
            server.wait(30)
        self.check(jobs)
        shutil.rmtree(work, ignore_errors=True)
        return elapsed

    def submit_all(self, work: Path, settings: Settings, sessions) -> None:
        with sessions() as session:
            register_challenge(session, self.root / "bench.yaml")
            for index, tag in enumerate(self.tags):
                tar = work / f"image-{index}.tar"
                subprocess.run(["docker", "save", tag, "-o", str(tar)], check=True)
                pinned = pin_tar(tar, self.client, store=open_store(settings.store_dir))
                submit(session, "bench", "test", f"team-{index}", pinned)
            session.commit()

    def check(self, jobs: int) -> None:
        expected = len(self.tags) * len(self.dataset.case_ids)
        if jobs != expected:
            raise SystemExit(f"the engine ran {jobs} jobs, expected {expected}")

    def bare(self) -> float:
        work = self.fresh("bare")
        api = self.client.api
        runner = DockerRunner(state_dir=work / "runs")  # reads a USER name as runc does
        started = time.perf_counter()
        for index, tag in enumerate(self.tags):
            subprocess.run(["docker", "save", tag, "-o", str(work / f"bare-{index}.tar")],
                           check=True)  # the same image hand-off as the engine's intake
            attributes = api.inspect_image(tag)
            user = effective_user(None, attributes["Config"].get("User") or "",
                                  lambda attributes=attributes: runner.account_files(attributes))
            for case_id in self.dataset.case_ids:
                inputs = stage(self.dataset, [case_id], work / f"in-{index}-{case_id}")
                output = work / f"out-{index}-{case_id}"
                output.mkdir()
                output.chmod(0o777)  # the image's user, not ours, writes here
                run_container(api, tag, user, inputs, output)
                score_cases([CasePair(case_id, output / case_id / "mask.nii.gz",
                                      self.dataset.ground_truth_path(case_id))], SETTINGS,
                            workers=1)
                unstage(inputs)
        elapsed = time.perf_counter() - started
        shutil.rmtree(work, ignore_errors=True)
        return elapsed


def server_settings(work: Path) -> Settings:
    return Settings(data_dir=work / "state", database_url=f"sqlite:///{work}/bench.db",
                    state_dir=work / "state" / "runner")


def server_environment(settings: Settings) -> dict[str, str]:
    return {**os.environ, "EPREUVE_DATA_DIR": str(settings.data_dir),
            "EPREUVE_DATABASE_URL": settings.database_url,
            "EPREUVE_STATE_DIR": str(settings.state_dir)}


class ScoresAsSlowlyAsItRuns:
    """The local coordinator, whose scoring takes as long as the run did (a slow
    evaluation): what a node must not wait for."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def complete(self, ticket, outcome) -> None:
        time.sleep(outcome.result.wall_seconds or 0.0)
        self.inner.complete(ticket, outcome)


def slot_busy_fraction(root: Path, tags: list[str], slots: int) -> dict[str, float]:
    """Each slot's busy fraction while the queue holds work (see the module's doc)."""
    work = root / "slots"
    work.mkdir()
    settings = server_settings(work)
    sessions = session_factory(settings.database_url)
    worker = Worker(sessions, settings, DockerRunner(state_dir=settings.state_dir / "runs"),
                    scoring_workers=1, gpus=[], cpu_slots=slots)
    worker.coordinator = ScoresAsSlowlyAsItRuns(worker.coordinator)
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    with sessions() as session:
        register_challenge(session, root / "bench.yaml")
        for index, tag in enumerate(tags):
            subprocess.run(["docker", "save", tag, "-o", str(work / f"{index}.tar")], check=True)
            pinned = pin_tar(work / f"{index}.tar", client, store=open_store(settings.store_dir))
            submit(session, "bench", "test", f"team-{index}", pinned)
        session.commit()
    worker.run(until_idle=True)
    uses = worker.slots.uses
    start, end = min(u.started for u in uses), max(u.started for u in uses)
    return busy_fractions(uses, [f"cpu-{i}" for i in range(slots)], start, end,
                          worker.slots.dry)


def run_container(api: docker.APIClient, image: str, user: str, inputs: Path,
                  output: Path) -> None:
    """One plain container with the engine's limits, network and user; nothing else."""
    host_config = api.create_host_config(
        network_mode="none", mem_limit=MEMORY_BYTES, memswap_limit=MEMORY_BYTES,
        nano_cpus=int(CPUS * 1e9),
        mounts=[Mount(target="/input", source=str(inputs), type="bind", read_only=True),
                Mount(target="/output", source=str(output), type="bind")])
    cid = api.create_container(image, user=user, network_disabled=True,
                               host_config=host_config)["Id"]
    try:
        api.start(cid)
        exit_code = api.wait(cid)["StatusCode"]
    finally:
        api.remove_container(cid, v=True, force=True)
    if exit_code != 0:
        raise SystemExit(f"bare run of {image} exited {exit_code}")


def build_images(submissions: int, *, sleep: float = 0.0) -> list[str]:
    """Distinct images, as distinct teams would send; `sleep`: each container sleeps that
    long before segmenting."""
    subprocess.run([str(REPO / "images/build.sh"), str(REPO / "images/examples/threshold"),
                    IMAGE], check=True, capture_output=True)
    tags = []
    slow = ('ENTRYPOINT ["sh", "-c", "sleep ' + f"{sleep:g}" +
            '; exec python3 /opt/algorithm/segment.py"]\n') if sleep else ""
    for index in range(submissions):
        tag = f"epreuve-bench/threshold{'-slow' if sleep else ''}-{index}:latest"
        with tempfile.TemporaryDirectory() as context:
            Path(context, "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL bench={index}\n"
                                                   + slow)
            subprocess.run(["docker", "build", "-q", "-t", tag, context], check=True,
                           capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                                     "PATH": "/usr/bin:/usr/local/bin:/bin"})
        tags.append(tag)
    return tags


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--submissions", type=int, default=2)
        parser.add_argument("--cases", type=int, default=5)
        parser.add_argument("--slots", type=int, default=2,
                            help="CPU slots of the node whose busy fraction is measured")
        parser.add_argument("--run-seconds", type=float, default=3.0,
                            help="how long each of its containers sleeps before segmenting")

    args = harness.arguments(__doc__.splitlines()[0], repeats=9, extra=extra, argv=argv)
    submissions, cases, size = (1, 2, 32) if args.quick else (args.submissions, args.cases, 64)
    tags = build_images(submissions)
    env = harness.environment()
    harness.print_environment(env)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        synth_dataset(root / "data", cases=cases, seed=3, size=size)
        seal(root / "data")
        bench = Bench(root, tags)
        measurement = harness.measure({"engine": bench.engine, "bare loop": bench.bare,
                                       "server + remote worker": bench.remote},
                                      repeats=args.repeats, warmup=args.warmup,
                                      log=harness.progress)
        slow_tags = build_images(max(args.slots, 2) if args.quick else 2 * args.slots,
                                 sleep=0.5 if args.quick else args.run_seconds)
        harness.progress("slot busy fraction: one node, slow scoring")
        fractions = slot_busy_fraction(root, slow_tags, 1 if args.quick else args.slots)
    title = (f"throughput, {submissions} submissions x {cases} cases = {submissions * cases} "
             f"containers a side, threshold example, {size}x{size}x{size * 2 // 3} CT")
    harness.print_rounds(measurement, title)
    harness.print_summary(measurement, title)
    overhead = harness.spread([r - 1 for r in measurement.ratios("bare loop")])
    print(f"\nengine overhead (engine / bare - 1), per round: median {overhead.median:+.1%}, "
          f"min - max {overhead.minimum:+.1%} - {overhead.maximum:+.1%}, "
          f"IQR {overhead.q1:+.1%} - {overhead.q3:+.1%}")
    remote = harness.spread(measurement.ratios("server + remote worker"))
    print(f"server + one remote worker against the local worker (engine / remote: the "
          f"remote's share of the local throughput; goal >= 0.9): median {remote.median:.3f}, "
          f"min - max {remote.minimum:.3f} - {remote.maximum:.3f}")
    print("slot busy fraction while the queue holds work, scoring as slow as the run "
          "(goal >= 0.95): " + ", ".join(f"{name} {value:.3f}"
                                         for name, value in fractions.items()))
    harness.print_load()
    harness.write_json(args.json, "throughput", env, {title: measurement.to_dict(),
                                                      "slot busy fraction": fractions})


if __name__ == "__main__":
    main()
