"""The one way every benchmark measures: warm-up, repeated interleaved rounds, median and spread.

    measure({"ours": run_ours, "docker run": run_theirs}, repeats=10, warmup=1)

Each contender is a function returning the seconds it measured (it times only the
work, not its own set-up). A round runs every contender once; the order rotates
from round to round (with two, they alternate which goes first), so that drift
in the machine's load and warm caches hit every side alike. Warm-up rounds run
the same way and are discarded. The first contender is "ours": every other one
gets a per-round ratio ours / theirs, summarised like the times.

Spread is reported two ways: min-max over all rounds and the interquartile
range (the middle half, inclusive quartiles). Nothing here decides what a
result means: it prints what was measured, and the environment it ran in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

Contender = Callable[[], float]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_CORETYPE")
LIBRARIES = ("numpy", "scipy", "docker", "SQLAlchemy", "psycopg", "torch", "monai",
             "threadpoolctl")


@dataclass(frozen=True)
class Spread:
    """Median, extremes and inclusive quartiles of a sample."""

    n: int
    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    ordered = sorted(values)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Spread(n=len(ordered), median=statistics.median(ordered), minimum=ordered[0],
                  maximum=ordered[-1], q1=q1, q3=q3)


@dataclass
class Measurement:
    """Every timed round of a comparison; the first name is ours."""

    names: list[str]
    rounds: list[dict[str, float]] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)

    @property
    def ours(self) -> str:
        return self.names[0]

    def times(self, name: str) -> list[float]:
        return [r[name] for r in self.rounds]

    def ratios(self, other: str) -> list[float]:
        """ours / other, round by round (both measured in the same round)."""
        return [r[self.ours] / r[other] for r in self.rounds]

    def summary(self) -> dict:
        return {
            "times": {name: asdict(spread(self.times(name))) for name in self.names},
            "ratios": {f"{self.ours} / {other}": asdict(spread(self.ratios(other)))
                       for other in self.names[1:]},
        }

    def to_dict(self) -> dict:
        return {"names": self.names, "rounds": self.rounds, "orders": self.orders,
                "summary": self.summary()}


def round_order(names: list[str], index: int) -> list[str]:
    """Rotate the starting contender each round: with two, they alternate going first."""
    shift = index % len(names)
    return names[shift:] + names[:shift]


def measure(contenders: Mapping[str, Contender], *, repeats: int, warmup: int = 1,
            log: Callable[[str], None] | None = None) -> Measurement:
    """Run `warmup` discarded rounds, then `repeats` recorded ones, in rotating order."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup not negative")
    names = list(contenders)
    result = Measurement(names=names)
    for index in range(warmup + repeats):
        order = round_order(names, index)
        timings = {name: float(contenders[name]()) for name in order}
        if index < warmup:
            continue
        result.rounds.append({name: timings[name] for name in names})
        result.orders.append(order)
        if log:
            log(f"round {index - warmup + 1}/{repeats}: " + ", ".join(
                f"{name} {timings[name]:.3f} s" for name in order))
    return result


def timed(function: Callable[[], object]) -> Contender:
    """A contender that times the whole call."""
    def run() -> float:
        started = time.perf_counter()
        function()
        return time.perf_counter() - started
    return run


# -- printing --------------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.3f} s"


def print_rounds(measurement: Measurement, title: str) -> None:
    """Every round: each contender's time and each ratio, in the order they ran."""
    others = measurement.names[1:]
    print(f"\n{title}: every round\n")
    header = ["round", "order", *measurement.names,
              *(f"{measurement.ours} / {o}" for o in others)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for index, (row, order) in enumerate(zip(measurement.rounds, measurement.orders,
                                             strict=True), start=1):
        cells = [str(index), " > ".join(str(measurement.names.index(n) + 1) for n in order),
                 *(seconds(row[n]) for n in measurement.names),
                 *(f"{row[measurement.ours] / row[o]:.3f}" for o in others)]
        print("| " + " | ".join(cells) + " |")


def print_summary(measurement: Measurement, title: str) -> None:
    """Median, min-max and IQR of each contender's time and of each ratio."""
    print(f"\n{title}: {len(measurement.rounds)} rounds (order numbers: "
          + ", ".join(f"{i} {n}" for i, n in enumerate(measurement.names, start=1)) + ")\n")
    print("| measured | median | min - max | IQR (q1 - q3) |")
    print("|---|---|---|---|")
    for name in measurement.names:
        s = spread(measurement.times(name))
        print(f"| {name} | {seconds(s.median)} | {seconds(s.minimum)} - {seconds(s.maximum)} "
              f"| {seconds(s.q1)} - {seconds(s.q3)} |")
    for other in measurement.names[1:]:
        s = spread(measurement.ratios(other))
        print(f"| ratio {measurement.ours} / {other} | {s.median:.3f} | "
              f"{s.minimum:.3f} - {s.maximum:.3f} | {s.q1:.3f} - {s.q3:.3f} |")


def print_steps(title: str, steps: Mapping[str, list[float]]) -> None:
    """Per-step timings recorded inside a contender (median and min-max)."""
    print(f"\n{title}\n")
    print("| step | runs | median | min - max |")
    print("|---|---|---|---|")
    for step, values in steps.items():
        s = spread(values)
        print(f"| {step} | {s.n} | {seconds(s.median)} | {seconds(s.minimum)} - "
              f"{seconds(s.maximum)} |")


# -- the environment -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cgroup_version() -> str:
    return "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"


def _docker_version() -> str:
    try:
        out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return out.stdout.strip() or "unavailable"


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment(*, docker: bool = True) -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "load_average": os.getloadavg(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cgroup": _cgroup_version(),
        "docker": _docker_version() if docker else "not used",
        "python": platform.python_version(),
        "libraries": _library_versions(),
        "threads": {name: os.environ.get(name, "unset") for name in THREAD_VARIABLES},
    }


def print_environment(env: Mapping) -> None:
    libraries = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    threads = ", ".join(f"{k}={v}" for k, v in env["threads"].items())
    load = " ".join(f"{x:.2f}" for x in env["load_average"])
    print(f"environment: {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable), "
          f"load {load}; kernel {env['kernel']} ({env['os']}), cgroup {env['cgroup']}, "
          f"Docker {env['docker']}; Python {env['python']}; {libraries}; {threads}")


def print_load() -> None:
    """The load average once the benchmark is done: other work on the machine shows here."""
    print("\nload average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


# -- command line ----------------------------------------------------------------------------


def arguments(description: str, *, repeats: int, warmup: int = 1,
              extra: Callable[[argparse.ArgumentParser], None] | None = None,
              argv: list[str] | None = None) -> argparse.Namespace:
    """The flags every benchmark takes; --quick is for tests: one round, no warm-up, small."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"recorded rounds (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"discarded rounds first (default {warmup})")
    parser.add_argument("--quick", action="store_true",
                        help="smallest workload, one round, no warm-up: checks it runs")
    parser.add_argument("--json", type=Path, help="also write every round here, as JSON")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    return args


def write_json(path: Path | None, benchmark: str, env: Mapping, results: Mapping) -> None:
    if path is None:
        return
    payload = {"benchmark": benchmark, "environment": dict(env), "results": dict(results)}
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- a server in its own process, for the benchmarks that time the API -----------------------

def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_uvicorn(factory: str, root: Path, env: dict, *extra: str,
                  ) -> tuple[subprocess.Popen, str]:
    """uvicorn in its own process serving `factory` (module:function) on a free loopback
    port, its log in root/server.log; returns once /healthz answers."""
    import httpx

    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "ab")  # noqa: SIM115 (the child keeps it open)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", *extra],
        cwd=repo, env={**env, "PYTHONPATH": str(repo)}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server never answered")
