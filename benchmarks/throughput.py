"""The engine's end-to-end overhead against a bare loop doing the same runs and scoring.

    .venv/bin/python benchmarks/throughput.py [--submissions 2] [--cases 5] [--repeats 9]
                                              [--warmup 1] [--quick] [--json out.json]

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
"""

from __future__ import annotations

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
from engine.worker import Worker
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
        settings = Settings(data_dir=work / "state", database_url=f"sqlite:///{work}/bench.db",
                            state_dir=work / "state" / "runner")
        sessions = session_factory(settings.database_url)  # migrations: before the clock
        worker = Worker(sessions, settings, DockerRunner(state_dir=settings.state_dir / "runs"),
                        scoring_workers=1)
        started = time.perf_counter()
        with sessions() as session:
            register_challenge(session, self.root / "bench.yaml")
            for index, tag in enumerate(self.tags):
                tar = work / f"image-{index}.tar"
                subprocess.run(["docker", "save", tag, "-o", str(tar)], check=True)
                pinned = pin_tar(tar, self.client, store=open_store(settings.store_dir))
                submit(session, "bench", "test", f"team-{index}", pinned)
            session.commit()
        jobs = worker.run(until_idle=True)
        elapsed = time.perf_counter() - started
        expected = len(self.tags) * len(self.dataset.case_ids)
        if jobs != expected:
            raise SystemExit(f"the engine ran {jobs} jobs, expected {expected}")
        shutil.rmtree(work, ignore_errors=True)
        return elapsed

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


def build_images(submissions: int) -> list[str]:
    subprocess.run([str(REPO / "images/build.sh"), str(REPO / "images/examples/threshold"),
                    IMAGE], check=True, capture_output=True)
    tags = []
    for index in range(submissions):  # distinct images, as distinct teams would send
        tag = f"epreuve-bench/threshold-{index}:latest"
        with tempfile.TemporaryDirectory() as context:
            Path(context, "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL bench={index}\n")
            subprocess.run(["docker", "build", "-q", "-t", tag, context], check=True,
                           capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                                     "PATH": "/usr/bin:/usr/local/bin:/bin"})
        tags.append(tag)
    return tags


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--submissions", type=int, default=2)
        parser.add_argument("--cases", type=int, default=5)

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
        measurement = harness.measure({"engine": bench.engine, "bare loop": bench.bare},
                                      repeats=args.repeats, warmup=args.warmup,
                                      log=harness.progress)
    title = (f"throughput, {submissions} submissions x {cases} cases = {submissions * cases} "
             f"containers a side, threshold example, {size}x{size}x{size * 2 // 3} CT")
    harness.print_rounds(measurement, title)
    harness.print_summary(measurement, title)
    overhead = harness.spread([r - 1 for r in measurement.ratios("bare loop")])
    print(f"\nengine overhead (engine / bare - 1), per round: median {overhead.median:+.1%}, "
          f"min - max {overhead.minimum:+.1%} - {overhead.maximum:+.1%}, "
          f"IQR {overhead.q1:+.1%} - {overhead.q3:+.1%}")
    harness.print_load()
    harness.write_json(args.json, "throughput", env, {title: measurement.to_dict()})


if __name__ == "__main__":
    main()
