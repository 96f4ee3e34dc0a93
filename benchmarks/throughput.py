"""The engine's end-to-end overhead against a bare loop over the same images and data.

    .venv/bin/python benchmarks/throughput.py [--submissions 4] [--cases 6]

Engine: N submissions (the threshold example) x M cases through the whole
pipeline: intake, queue, smoke job, shards of one case, seal verification,
staging, the hardened runner, output validation, scoring, results, aggregates.
Bare loop: for the same images and cases, `docker run --rm --network none`
with /input mounted, then the same scoring function, nothing else. Printed side
by side with the ratio; goal: engine overhead under 15% of the bare loop.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker

from engine.config import Settings
from engine.datasets import seal, stage, unstage
from engine.db import session_factory
from engine.images import pin_tar
from engine.scoring.cases import CasePair, score_cases
from engine.scoring.segmentation import SegmentationSettings
from engine.submissions import register_challenge, submit
from engine.synthetic import synth_dataset
from engine.worker import Worker
from runners.docker import DockerRunner

REPO = Path(__file__).resolve().parent.parent
IMAGE = "epreuve-example/threshold:latest"
CHALLENGE = """
id: bench
title: Throughput benchmark
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}
metrics: {labels: [1, 2], nsd_tolerance_mm: 4.0}
ranking: {metrics: [{metric: dice, label: 1}]}
phases:
  - id: test
    dataset: {path: data}
    quota: {submissions: 1000, per: 1d}
    cases_per_run: 1
    limits: {memory: 1g, cpus: 1, time_per_case: 120s}
"""
SETTINGS = SegmentationSettings(labels=(1, 2), nsd_tolerance_mm=4.0)


def engine_run(root: Path, tags: list[str]) -> float:
    settings = Settings(data_dir=root / "state", database_url=f"sqlite:///{root}/bench.db",
                        state_dir=root / "state" / "runner")
    sessions = session_factory(settings.database_url)
    (root / "bench.yaml").write_text(CHALLENGE)
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    started = time.monotonic()
    with sessions() as session:
        register_challenge(session, root / "bench.yaml")
        for index, tag in enumerate(tags):
            tar = root / f"image-{index}.tar"
            subprocess.run(["docker", "save", tag, "-o", str(tar)], check=True)
            submit(session, "bench", "test", f"team-{index}", pin_tar(tar, client))
    runner = DockerRunner(state_dir=settings.state_dir / "runs")
    Worker(sessions, settings, runner, scoring_workers=1).run(until_idle=True)
    return time.monotonic() - started


def bare_loop(root: Path, tags: list[str]) -> float:
    from engine.datasets import load

    dataset = load(root / "data")
    started = time.monotonic()
    for index, tag in enumerate(tags):
        subprocess.run(["docker", "save", tag, "-o", str(root / f"bare-{index}.tar")],
                       check=True)  # the same image hand-off as the engine's intake
        for case_id in dataset.case_ids:
            inputs = stage(dataset, [case_id], root / f"bare-in-{index}-{case_id}")
            output = root / f"bare-out-{index}-{case_id}"
            output.mkdir()
            subprocess.run(["docker", "run", "--rm", "--network", "none", "-v",
                            f"{inputs}:/input:ro", "-v", f"{output}:/output", "--user", "0",
                            tag], check=True, capture_output=True)
            score_cases([CasePair(case_id, output / case_id / "mask.nii.gz",
                                  dataset.ground_truth_path(case_id))], SETTINGS, workers=1)
            unstage(inputs)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=4)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    subprocess.run([str(REPO / "images/build.sh"), str(REPO / "images/examples/threshold"),
                    IMAGE], check=True, capture_output=True)
    tags = []
    for index in range(args.submissions):  # distinct images, as distinct teams would send
        tag = f"epreuve-bench/threshold-{index}:latest"
        with tempfile.TemporaryDirectory() as context:
            Path(context, "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL bench={index}\n")
            subprocess.run(["docker", "build", "-q", "-t", tag, context], check=True,
                           capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                                     "PATH": "/usr/bin:/usr/local/bin:/bin"})
        tags.append(tag)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        synth_dataset(root / "data", cases=args.cases, seed=3, size=64)
        seal(root / "data")
        bare = bare_loop(root, tags)
        engine = engine_run(root, tags)
    runs = args.submissions * args.cases
    print(f"\n{args.submissions} submissions x {args.cases} cases = {runs} container runs, "
          "one case each, threshold example, 64x64x42 CT\n")
    print("| pipeline | total | per case | ratio engine / bare | engine overhead |")
    print("|---|---|---|---|---|")
    print(f"| bare loop: docker save + docker run --rm --network none + scoring | {bare:.1f} s "
          f"| {bare / runs:.2f} s | | |")
    print(f"| Épreuve: intake, queue, smoke job, verification, staging, hardened runner, "
          f"validation, scoring, results, aggregates | {engine:.1f} s | {engine / runs:.2f} s "
          f"| {engine / bare:.2f} | {(engine / bare - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
