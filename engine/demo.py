"""`epreuve demo`: what the README's main command shows on a fresh machine."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from runners.base import MiB, RunSpec
from runners.docker import DockerRunner
from runners.messages import human_bytes

PROBE_TAG = "epreuve-demo/probe:latest"
SCENARIOS = [
    ("well-behaved algorithm", ("python3", "/opt/probes/hello.py"), {}),
    ("memory hog, 128 MiB limit", ("python3", "/opt/probes/memory_hog.py"),
     {"memory_bytes": 128 * MiB}),
    ("ignores SIGTERM, 2 s limit", ("python3", "/opt/probes/ignore_sigterm.py"),
     {"timeout_seconds": 2, "stop_grace_seconds": 1}),
    ("fills /output, 8 MiB quota", ("python3", "/opt/probes/fill_output.py"),
     {"output_quota_bytes": 8 * MiB}),
    ("fork bomb, 64 processes, 3 s", ("python3", "/opt/probes/fork_bomb.py"),
     {"pids_limit": 64, "timeout_seconds": 3, "stop_grace_seconds": 1}),
    ("floods 64 MiB of log", ("python3", "/opt/probes/log_flood.py", str(64 * MiB)),
     {"log_cap_bytes": 64 * 1024}),
    ("image that is not on the node", None, {"image": "epreuve-demo/absent:latest"}),
]


def build_probe_image(repo: Path) -> str:
    subprocess.run([str(repo / "images" / "build.sh"), str(repo / "images" / "adversarial"),
                    PROBE_TAG, "--target", "probe"], check=True, capture_output=True)
    return PROBE_TAG


def run_sandbox_demo(console: Console, repo: Path) -> None:
    runner = DockerRunner()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress:
        progress.add_task("building the base and demo images offline", total=None)
        image = build_probe_image(repo)
    table = Table(title="Épreuve sandbox: every run contained, every failure typed")
    table.add_column("scenario", ratio=1)
    for column in ("status", "reason", "wall", "CPU", "peak memory", "log"):
        table.add_column(column, no_wrap=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("", total=len(SCENARIOS))
        for index, (name, command, overrides) in enumerate(SCENARIOS):
            progress.update(task, description=f"running: {name}")
            spec = RunSpec(**{"image": image, "command": command, "timeout_seconds": 60,
                              "output_dir": Path(scratch) / str(index), **overrides})
            result = runner.run(spec)
            table.add_row(
                name, result.status.value, result.reason.value if result.reason else "-",
                "-" if result.wall_seconds is None else f"{result.wall_seconds:.2f} s",
                "-" if result.cpu_seconds is None else f"{result.cpu_seconds:.2f} s",
                human_bytes(result.peak_memory_bytes) if result.peak_memory_bytes else "-",
                human_bytes(result.log_bytes) + (" (capped)" if result.log_truncated else ""),
            )
            progress.advance(task)
    console.print(table)
