"""What the hardened sandbox costs per run, against a plain `docker run --rm --network none`.

    .venv/bin/python benchmarks/sandbox_overhead.py [--repeat-trivial 15] [--repeat-work 5]

Both sides run the same image and command, end to end (create, start, wait,
remove), timed on the host with a monotonic clock, alternating so that drift in
the machine's load hits both equally. Ours also mounts a tmpfs /output, makes a
per-run cgroup, streams and counts the logs, and collects outputs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.base import RunSpec
from runners.docker import DockerRunner

IMAGE = "epreuve/base:3.11"
WORKLOADS = {
    "trivial (true)": ("true",),
    "2 s CPU": ("python3", "-c", "import time\nt = time.process_time()\n"
                "while time.process_time() - t < 2.0: pass"),
}


def bare_docker_run(command: tuple[str, ...]) -> float:
    started = time.monotonic()
    subprocess.run(["docker", "run", "--rm", "--network", "none", IMAGE, *command],
                   check=True, capture_output=True)
    return time.monotonic() - started


def sdk_run_unhardened(runner: DockerRunner, command: tuple[str, ...]) -> float:
    """The SDK with no sandbox at all: isolates the hardening from the CLI's process start-up."""
    started = time.monotonic()
    runner.client.containers.run(IMAGE, list(command), network_mode="none", remove=True)
    return time.monotonic() - started


def epreuve_run(runner: DockerRunner, command: tuple[str, ...]) -> float:
    started = time.monotonic()
    result = runner.run(RunSpec(image=IMAGE, command=command, timeout_seconds=60))
    elapsed = time.monotonic() - started
    if not result.succeeded:
        raise SystemExit(f"benchmark run failed: {result.reason} {result.message}")
    return elapsed


def measure(runner: DockerRunner, command: tuple[str, ...], repeat: int) -> tuple[list, ...]:
    bare_docker_run(command)  # warm every path: page cache, image layers
    sdk_run_unhardened(runner, command)
    epreuve_run(runner, command)
    bare, sdk, ours = [], [], []
    for _ in range(repeat):
        bare.append(bare_docker_run(command))
        sdk.append(sdk_run_unhardened(runner, command))
        ours.append(epreuve_run(runner, command))
    return bare, sdk, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat-trivial", type=int, default=15)
    parser.add_argument("--repeat-work", type=int, default=5)
    args = parser.parse_args()
    subprocess.run([str(Path(__file__).resolve().parent.parent / "images/base/build.sh")],
                   check=True)
    runner = DockerRunner()
    rows = []
    for name, command in WORKLOADS.items():
        repeat = args.repeat_trivial if name.startswith("trivial") else args.repeat_work
        medians = [statistics.median(times) for times in measure(runner, command, repeat)]
        rows.append((name, repeat, *medians))
    print(f"\nSandbox overhead per run (median wall seconds, end to end; {IMAGE})\n")
    print("| workload | runs | docker run --rm --network none | SDK, no hardening "
          "| Épreuve DockerRunner | ratio ours / docker run | ratio ours / SDK "
          "| overhead vs docker run | overhead vs SDK |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, repeat, bare, sdk, ours in rows:
        print(f"| {name} | {repeat} | {bare:.3f} s | {sdk:.3f} s | {ours:.3f} s "
              f"| {ours / bare:.2f} | {ours / sdk:.2f} | {(ours - bare) * 1000:+.0f} ms "
              f"| {(ours - sdk) * 1000:+.0f} ms |")


if __name__ == "__main__":
    main()
