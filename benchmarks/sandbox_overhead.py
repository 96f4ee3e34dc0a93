"""What the hardened sandbox costs per container run, against plain runs with the same network.

    .venv/bin/python benchmarks/sandbox_overhead.py [--repeats 20] [--repeats-work 8]
                                                    [--warmup 1] [--quick] [--json out.json]

Every side runs the same image and command end to end (create, start, wait,
remove), timed on the host, in rounds whose order rotates (benchmarks/harness.py).
Workloads: `true`; `sleep 2` (a 2 s run whose length does not depend on how
busy the CPUs are, so the difference is the sandbox's own cost); a 2 s CPU loop
(its wall time also measures what else the machine is running).
The network is the same everywhere it can be: no network, set as
`HostConfig.NetworkMode=none` plus `Config.NetworkDisabled=true` (what the
runner sets), for the SDK run and the raw API. The docker CLI has no flag for
NetworkDisabled, so `docker run --network none` gets NetworkMode=none only; the
SDK run is measured both ways, so the cost of that one setting is printed too.

Ours adds: image inspection (never pull), a tmpfs /output with a quota, a
per-run cgroup, capabilities dropped, read-only root, limits, init, log
streaming, accounting and output collection. Its phases and the raw API's steps
are timed separately and printed, so that any explanation rests on a number.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from runners.base import RunSpec
from runners.docker import DockerRunner

REPO = Path(__file__).resolve().parent.parent
IMAGE = "epreuve/base:3.11"
TRIVIAL = ("true",)
LEGEND = """contenders (no network on every side: NetworkMode=none, and NetworkDisabled=true
where the tool can set it):
  ours                       runners.docker.DockerRunner.run, hardened, NetworkDisabled=true
  raw API                    APIClient create_container/start/wait/remove_container,
                             NetworkDisabled=true, no hardening
  SDK run                    client.containers.run(remove=True), NetworkDisabled=true
  SDK run, NetworkMode only  the same with NetworkDisabled=false: the cost of that setting
  docker run                 docker run --rm --network none (the CLI cannot set
                             NetworkDisabled, so it is false here)
  ours, no run cgroup        ours with use_cgroups=False: the container stays in Docker's
                             own cgroup, as the others' do (accounting then samples the
                             stats API once a second instead)"""


def cpu_work(seconds: float) -> tuple[str, ...]:
    return ("python3", "-c", "import time\nt = time.process_time()\n"
            f"while time.process_time() - t < {seconds}: pass")


class TimedRunner(DockerRunner):
    """The production runner, with the wall time of each of its phases recorded."""

    PHASES = ("resolve_image", "_provision", "_create_container", "_execute", "_collect",
              "_deprovision")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.steps: dict[str, list[float]] = defaultdict(list)
        for phase in self.PHASES:
            setattr(self, phase, self._timing(phase, getattr(self, phase)))

    def _timing(self, name, method):
        def timed_method(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.steps[name].append(time.perf_counter() - started)
        return timed_method


def ours(runner: DockerRunner, command: tuple[str, ...]) -> float:
    started = time.perf_counter()
    result = runner.run(RunSpec(image=IMAGE, command=command, timeout_seconds=120))
    elapsed = time.perf_counter() - started
    if not result.succeeded:
        raise SystemExit(f"benchmark run failed: {result.reason} {result.message}")
    return elapsed


def docker_cli(command: tuple[str, ...]) -> float:
    started = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", "--network", "none", IMAGE, *command],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def sdk_run(runner: DockerRunner, command: tuple[str, ...], *, disabled: bool) -> float:
    started = time.perf_counter()
    runner.client.containers.run(IMAGE, list(command), network_mode="none",
                                 network_disabled=disabled, remove=True)
    return time.perf_counter() - started


def raw_api(runner: DockerRunner, command: tuple[str, ...],
            steps: dict[str, list[float]]) -> float:
    """create, start, wait, remove: the least any runner must do, each step timed."""
    api = runner.api
    marks = [time.perf_counter()]
    cid = api.create_container(IMAGE, list(command), network_disabled=True,
                               host_config=api.create_host_config(network_mode="none"))["Id"]
    marks.append(time.perf_counter())
    api.start(cid)
    marks.append(time.perf_counter())
    exit_code = api.wait(cid)["StatusCode"]
    marks.append(time.perf_counter())
    api.remove_container(cid, v=True)
    marks.append(time.perf_counter())
    if exit_code != 0:
        raise SystemExit(f"raw API run exited {exit_code}")
    for name, start, stop in zip(("create", "start", "wait", "remove"), marks, marks[1:],
                                 strict=False):
        steps[name].append(stop - start)
    return marks[-1] - marks[0]


def compare(runner: TimedRunner, uncgrouped: DockerRunner, command: tuple[str, ...],
            repeats: int, warmup: int):
    api_steps: dict[str, list[float]] = defaultdict(list)
    runner.steps.clear()
    contenders = {
        "ours": lambda: ours(runner, command),
        "raw API": lambda: raw_api(runner, command, api_steps),
        "SDK run": lambda: sdk_run(runner, command, disabled=True),
        "SDK run, NetworkMode only": lambda: sdk_run(runner, command, disabled=False),
        "docker run": lambda: docker_cli(command),
        "ours, no run cgroup": lambda: ours(uncgrouped, command),
    }
    measurement = harness.measure(contenders, repeats=repeats, warmup=warmup,
                                  log=harness.progress)
    # steps were recorded in warm-up rounds too: keep the recorded rounds only
    ours_steps = {k: v[-repeats:] for k, v in runner.steps.items()}
    return measurement, {k: v[-repeats:] for k, v in api_steps.items()}, ours_steps


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__.splitlines()[0], repeats=20, extra=lambda p: p.add_argument(
        "--repeats-work", type=int, default=8, help="rounds of the 2 s workloads (default 8)"),
        argv=argv)
    work_seconds = 0.2 if args.quick else 2.0
    work_repeats = 1 if args.quick else args.repeats_work
    workloads = {"trivial (true)": (TRIVIAL, args.repeats),
                 f"{work_seconds:g} s sleep": (("sleep", f"{work_seconds:g}"), work_repeats),
                 f"{work_seconds:g} s CPU": (cpu_work(work_seconds), work_repeats)}
    subprocess.run([str(REPO / "images/base/build.sh")], check=True, capture_output=True)
    env = harness.environment()
    harness.print_environment(env)
    print(LEGEND)
    runner = TimedRunner()
    uncgrouped = DockerRunner(use_cgroups=False)
    results = {}
    for name, (command, repeats) in workloads.items():
        measurement, api_steps, ours_steps = compare(runner, uncgrouped, command, repeats,
                                                       args.warmup)
        title = f"sandbox overhead, {name}, {IMAGE}"
        harness.print_rounds(measurement, title)
        harness.print_summary(measurement, title)
        harness.print_steps(f"{name}: raw API steps", api_steps)
        harness.print_steps(f"{name}: ours, phases of DockerRunner.run (_provision includes "
                            "resolve_image and _create_container)", ours_steps)
        results[name] = {**measurement.to_dict(), "raw_api_steps": api_steps,
                         "runner_phases": ours_steps}
    harness.print_load()
    harness.write_json(args.json, "sandbox_overhead", env, results)


if __name__ == "__main__":
    main()
