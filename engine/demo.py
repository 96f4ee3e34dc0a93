"""`epreuve demo`: a whole challenge on this machine, from nothing to a leaderboard.

1. builds the base and example images offline (threshold segmenter, its noisy
   ablation, the MONAI UNet, a broken image);
2. synthesises and seals a validation set (SQLite, local Docker Engine: nothing
   else to install);
3. creates the challenge from challenges/demo-liver.yaml;
4. submits each example as its own team, runs a worker until the queue is empty;
5. prints the leaderboard, runtime per case, and the broken submission's reason.

`epreuve demo --sandbox` instead shows hostile images being contained.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.statuses import SubmissionStatus
from runners.base import MiB, RunSpec
from runners.docker import DockerRunner
from runners.messages import human_bytes

EXAMPLES = {  # team -> (image directory, tag, extra Dockerfile line for a variant)
    "threshold": ("threshold", "epreuve-example/threshold:latest", None),
    "threshold-no-smoothing": ("threshold", "epreuve-example/threshold-no-smoothing:latest",
                               'CMD ["--no-smoothing"]'),
    "monai-unet": ("unet", "epreuve-example/unet:latest", None),
    "broken": ("broken", "epreuve-example/broken:latest", None),
}
DEMO_CASES = 6


def build_examples(repo: Path, progress: Progress) -> dict[str, str]:
    built: dict[str, str] = {}
    for team, (directory, tag, variant) in EXAMPLES.items():
        task = progress.add_task(f"building {tag}", total=None)
        if variant is None:
            subprocess.run([str(repo / "images" / "build.sh"), str(repo / "images" / "examples"
                            / directory), tag], check=True, capture_output=True)
        else:
            with tempfile.TemporaryDirectory() as context:
                base = EXAMPLES[directory][1]
                (Path(context) / "Dockerfile").write_text(f"FROM {base}\n{variant}\n")
                docker.DockerClient(base_url="unix:///var/run/docker.sock").images.build(
                    path=context, tag=tag, network_mode="none", rm=True)
        progress.remove_task(task)
        built[team] = tag
    return built


def prepare_challenge(repo: Path, root: Path) -> Path:
    from engine.datasets import seal
    from engine.synthetic import synth_dataset

    for phase, seed, cases in (("validation", 7, DEMO_CASES), ("final", 8, 8)):
        target = root / "data" / "demo-liver" / phase
        if not (target / "manifest.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            synth_dataset(target, cases=cases, seed=seed, size=64)
            seal(target)
    challenge_file = root / "demo-liver.yaml"
    shutil.copy(repo / "challenges" / "demo-liver.yaml", challenge_file)
    return challenge_file


def run_demo(console: Console, repo: Path) -> None:
    from engine.config import load_settings
    from engine.db import session_factory
    from engine.images import pin_tar, save_image
    from engine.leaderboard import leaderboard
    from engine.rendering import leaderboard_blocks, leaderboard_report, print_table
    from engine.store import open_store
    from engine.submissions import register_challenge, submit
    from engine.worker import Worker

    settings = load_settings()
    root = settings.data_dir / "demo"
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runner = DockerRunner(state_dir=settings.state_dir / "runs")
    client = docker.DockerClient(base_url=runner.base_url)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        images = build_examples(repo, progress)
        task = progress.add_task("synthesising and sealing the test sets", total=None)
        challenge_file = prepare_challenge(repo, root)
        progress.remove_task(task)
    console.print(f"[green]✓[/green] images built and test sets sealed "
                  f"({time.monotonic() - started:.0f} s)")
    sessions = session_factory(settings.database_url)
    submitted = {}
    with sessions() as session, tempfile.TemporaryDirectory(dir=root) as scratch:
        register_challenge(session, challenge_file)
        session.commit()
        for team, tag in images.items():
            tar = save_image(tag, Path(scratch) / "image.tar", client)
            pinned = pin_tar(tar, client, store=open_store(settings.store_dir), reference=tag,
                             work_dir=Path(scratch))
            submitted[team] = submit(session, "demo-liver", "validation", team, pinned).id
            session.commit()
            tar.unlink()
    console.print(f"[green]✓[/green] challenge demo-liver created; submitted "
                  f"{', '.join(f'{t} (#{i})' for t, i in submitted.items())}")
    worker = Worker(sessions, settings, runner, heartbeat_seconds=5)
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task("a worker runs the queue (smoke job first for each submission)",
                          total=None)
        jobs = worker.run(until_idle=True)
    console.print(f"[green]✓[/green] {jobs} jobs run ({time.monotonic() - started:.0f} s "
                  "since the start)")
    with sessions() as session:
        entries = leaderboard(session, "demo-liver", "validation")
        print_table(console, leaderboard_blocks(leaderboard_report("demo-liver", "validation",
                                                                   entries)))
        _print_failures(console, session, submitted)


def _print_failures(console: Console, session, submitted: dict[str, int]) -> None:
    from rich.text import Text

    from engine.db.models import SubmissionRow
    from engine.reports import terminal_text

    for team, submission_id in submitted.items():
        submission = session.get(SubmissionRow, submission_id)
        if submission.status == SubmissionStatus.FAILED:
            # messages and logs are text, never markup (a log may print "[/red]")
            console.print(Text.assemble((terminal_text(f"{team} (#{submission_id}): "
                                                       f"{submission.reason}"), "red"),
                                        " — ", terminal_text(submission.message or "")))
            last_job = submission.jobs[-1].run_result or {}
            # stdout and stderr reach the log by separate streams: show a few lines
            for line in (last_job.get("log_tail") or "").strip().splitlines()[-3:]:
                console.print(Text(terminal_text(f"  log: {line}")))
    console.print("Explore: epreuve status <id>, epreuve leaderboard demo-liver validation, "
                  "epreuve check <image> -c demo-liver")


# -- the sandbox showcase (epreuve demo --sandbox) ----------------------------------------

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


def run_sandbox_demo(console: Console, repo: Path) -> None:
    runner = DockerRunner()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress:
        progress.add_task("building the base and probe images offline", total=None)
        subprocess.run([str(repo / "images" / "build.sh"), str(repo / "images" / "adversarial"),
                        PROBE_TAG, "--target", "probe"], check=True, capture_output=True)
    table = Table(title="Épreuve sandbox: every run contained, every failure typed")
    table.add_column("scenario", ratio=1)
    for column in ("status", "reason", "wall", "CPU", "peak memory", "log"):
        table.add_column(column, no_wrap=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("", total=len(SCENARIOS))
        for index, (name, command, overrides) in enumerate(SCENARIOS):
            progress.update(task, description=f"running: {name}")
            spec = RunSpec(**{"image": PROBE_TAG, "command": command, "timeout_seconds": 60,
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
