"""The `epreuve` command."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from engine.errors import EXIT_NO_ENGINE
from engine.units import parse_size
from runners.base import RunResult, RunSpec
from runners.messages import human_bytes


class _ExpectedFailures(TyperGroup):
    """The one place where an expected failure becomes an error line and an exit code
    (engine/errors.py): a user never sees a traceback for one."""

    def invoke(self, ctx):
        from engine.errors import exit_code, expected

        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not expected(exc):
                raise
            _error(exc)
            raise typer.Exit(exit_code(exc)) from None


app = typer.Typer(help="Épreuve: evaluate containerised algorithms on sealed medical-imaging "
                       "test sets.", no_args_is_help=True, pretty_exceptions_show_locals=False,
                  cls=_ExpectedFailures)
sandbox_app = typer.Typer(help="Run one image in exactly the sandbox the workers use.",
                          no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
dataset_app = typer.Typer(help="Sealed datasets: synthesise, seal, verify, release.",
                          no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
challenge_app = typer.Typer(help="Challenges: create from a YAML file; the file's reference.",
                            no_args_is_help=True)
app.add_typer(challenge_app, name="challenge")

console = Console()
errors = Console(stderr=True)

EXIT_FAILED_RUN = 1


def _error(message: object) -> None:
    """An error line: the message is text (it may quote a file, an image or a log), never
    rich markup."""
    from engine.reports import terminal_text

    errors.print(Text.assemble(("error:", "red"), " ", terminal_text(message)), soft_wrap=True)


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@sandbox_app.command("run")
def sandbox_run(
    image: str = typer.Argument(..., help="Image reference or id, already on this node."),
    command: list[str] | None = typer.Argument(None, help="Command to run instead of the "
                                               "image's CMD (after `--`)."),
    input_dir: Path | None = typer.Option(None, "--input", exists=True, file_okay=False,
                                          help="Mounted read-only at /input."),
    output_dir: Path | None = typer.Option(None, "--output", file_okay=False,
                                           help="Where files written to /output are collected."),
    timeout: float = typer.Option(600, help="Time limit in seconds."),
    memory: str = typer.Option("2g", help="Memory limit (no swap), e.g. 512m, 2g."),
    cpus: float = typer.Option(1.0, help="CPU quota in cores."),
    pids: int = typer.Option(256, help="Maximum number of processes and threads."),
    output_quota: str = typer.Option("1g", help="Maximum size of /output."),
    tmp_size: str = typer.Option("256m", help="Size of the /tmp tmpfs (counts as memory)."),
    shm_size: str = typer.Option("64m", help="Size of /dev/shm."),
    gpus: str = typer.Option("", help="Comma-separated GPU UUIDs to hand to the container."),
    user: str | None = typer.Option(None, help="uid[:gid] to run as (root is remapped)."),
    log_cap: str = typer.Option("1m", help="Bytes of log kept (the tail)."),
    grace: float = typer.Option(10, help="Seconds between SIGTERM and SIGKILL."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Run IMAGE once, sandboxed, and report what happened. Exit status 0 only on success."""
    from runners.docker import DockerRunner, DockerUnavailable

    try:  # an absurd limit (nan, inf, 0, weeks) is refused before anything is created
        spec = RunSpec(
            image=image,
            command=tuple(command) if command else None,
            input_dir=input_dir,
            output_dir=output_dir,
            timeout_seconds=timeout,
            memory_bytes=_size(memory),
            cpus=cpus,
            pids_limit=pids,
            output_quota_bytes=_size(output_quota),
            tmp_size_bytes=_size(tmp_size),
            shm_size_bytes=_size(shm_size),
            gpu_uuids=tuple(uuid.strip() for uuid in gpus.split(",") if uuid.strip()),
            user=user,
            log_cap_bytes=_size(log_cap),
            stop_grace_seconds=grace,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        runner = DockerRunner()
    except DockerUnavailable as exc:
        _error(exc)
        raise typer.Exit(EXIT_NO_ENGINE) from None
    cancel = threading.Event()
    try:
        if as_json:
            result = runner.run(spec, cancel)
        else:
            with console.status(f"running {escape(image)} (limit {timeout:g} s)"):
                result = runner.run(spec, cancel)
    except KeyboardInterrupt:  # the runner has already removed the container
        cancel.set()
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        _print_result(result)
    raise typer.Exit(0 if result.succeeded else EXIT_FAILED_RUN)


def _print_result(result: RunResult) -> None:
    colour = "green" if result.succeeded else "red"
    title = result.status.value + (f": {result.reason.value}" if result.reason else "")
    table = Table(show_header=False, box=None)
    rows = [
        ("exit code", result.exit_code),
        ("wall time", None if result.wall_seconds is None else f"{result.wall_seconds:.3f} s"),
        ("CPU time", None if result.cpu_seconds is None else f"{result.cpu_seconds:.3f} s"),
        ("peak memory", human_bytes(result.peak_memory_bytes)),
        ("peak processes", result.peak_pids),
        ("output", f"{human_bytes(result.output_bytes)} in {result.output_files} files"),
        ("log", human_bytes(result.log_bytes) + (" (truncated)" if result.log_truncated else "")),
        ("ran as", result.user),
        ("accounting", result.accounting),
    ]
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    console.print(Panel(table, title=f"[{colour}]{title}[/{colour}]", expand=False))
    from engine.reports import terminal_text

    console.print(Text(terminal_text(result.message)))
    for skipped in result.skipped_outputs:
        console.print(Text.assemble(("not collected:", "yellow"), " ", terminal_text(skipped)))
    if result.log_tail:
        tail = "\n".join(result.log_tail.splitlines()[-20:])
        console.print(Panel(Text(terminal_text(tail)), title="log (last lines)", expand=False))


REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_DATASET_ERROR = 1


@app.command()
def score(
    prediction: Path = typer.Argument(..., exists=True, help="Predicted mask (NIfTI, MHA, DICOM)."),
    reference: Path = typer.Argument(..., exists=True, help="Reference mask on the same grid."),
    labels: str | None = typer.Option(None, help="Comma-separated labels (default: every "
                                      "non-zero label present in either mask)."),
    nsd_tolerance: float = typer.Option(1.0, "--nsd-tolerance", help="NSD tolerance in mm."),
    surface: str = typer.Option("edge", help="edge (MONAI-compatible) or subvoxel "
                                "(DeepMind-compatible)."),
    lesion_wise: bool = typer.Option(False, "--lesion-wise", help="Add BraTS-2023 lesion-wise "
                                     "Dice and HD95."),
    as_json: bool = typer.Option(False, "--json", help="Print {label: {metric: value}}."),
) -> None:
    """Score one predicted mask against its reference, per label."""
    import numpy as np

    from engine.medio import MedioError, geometry_differences, read_volume
    from engine.scoring.cases import LesionSettings, score_pair
    from engine.scoring.segmentation import SegmentationSettings, labels_present, parse_labels

    if surface not in ("edge", "subvoxel"):
        raise typer.BadParameter("--surface is edge or subvoxel")
    try:
        pred, ref = read_volume(prediction), read_volume(reference)
    except MedioError as exc:
        _error(exc)
        raise typer.Exit(1) from None
    problems = geometry_differences(pred.geometry, ref.geometry)
    if problems:
        _error("the masks are not on the same voxel grid: " + "; ".join(problems))
        raise typer.Exit(1)
    chosen = parse_labels(labels) or labels_present(pred.array, ref.array) or (1,)
    settings = SegmentationSettings(labels=chosen, nsd_tolerance_mm=nsd_tolerance,
                                    surface=surface)
    scores = score_pair(np.asarray(pred.array), np.asarray(ref.array), ref.spacing, settings,
                        LesionSettings(enabled=lesion_wise))
    if as_json:
        print(json.dumps({str(label): values for label, values in scores.items()}))
        return
    table = Table(title=f"{prediction.name} vs {reference.name} (spacing "
                        f"{', '.join(f'{s:.3g}' for s in ref.spacing)} mm)")
    table.add_column("metric")
    for label in scores:
        table.add_column(f"label {label}", justify="right")
    for metric in next(iter(scores.values())):
        table.add_row(metric, *(f"{scores[label][metric]:.4f}" for label in scores))
    console.print(table)


@dataset_app.command("synth")
def dataset_synth(
    directory: Path = typer.Argument(..., file_okay=False, help="Where to write the dataset."),
    cases: int = typer.Option(10, min=1, help="Number of cases."),
    image_format: str = typer.Option("nifti", "--format", help="nifti or dicom."),
    task: str = typer.Option("segmentation", help="segmentation or classification."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    size: int = typer.Option(96, min=16, help="In-plane matrix size."),
) -> None:
    """Write synthetic CT-like cases with label maps (or class labels), ready to seal."""
    from rich.progress import Progress

    from engine.synthetic import synth_dataset

    if image_format not in ("nifti", "dicom") or task not in ("segmentation", "classification"):
        raise typer.BadParameter("--format is nifti or dicom; --task segmentation or "
                                 "classification")
    with Progress(console=console, transient=True) as progress:
        task_id = progress.add_task(f"synthesising {cases} cases", total=None)
        ids = synth_dataset(directory, cases=cases, image_format=image_format, task=task,
                            seed=seed, size=size)
        progress.update(task_id, completed=cases, total=cases)
    console.print(Text(f"wrote {len(ids)} {task} cases ({image_format}) to {directory}"))


@dataset_app.command("seal")
def dataset_seal(directory: Path = typer.Argument(..., exists=True, file_okay=False)) -> None:
    """Check every case, write manifest.json, make the files read-only; print the version."""
    from engine.datasets import DatasetError, seal

    try:
        dataset = seal(directory)
    except DatasetError as exc:
        _error(exc)
        raise typer.Exit(EXIT_DATASET_ERROR) from None
    console.print(f"sealed {len(dataset.case_ids)} cases; version {dataset.version}")


@dataset_app.command("verify")
def dataset_verify(
    source: Path = typer.Argument(..., exists=True, help="A dataset directory or a released "
                                  "archive."),
    full: bool = typer.Option(False, "--full", help="Re-hash every file, ignoring the cache."),
) -> None:
    """Compare every file with the seal; exit 1 and name each added, missing or changed file."""
    from engine.config import load_settings
    from engine.datasets import DatasetError, VerificationCache, verify

    # the workers' cache too: one place remembers what was verified
    cache = VerificationCache(load_settings().state_dir / "verify")
    try:
        report = verify(source, cache=cache, full=full)
    except DatasetError as exc:
        _error(exc)
        raise typer.Exit(EXIT_DATASET_ERROR) from None
    for line in report.lines():
        console.print(Text(line))
    if not report.ok:
        errors.print(Text(f"{source} does not match its seal ({report.version[:12]})",
                          style="red"))
        raise typer.Exit(EXIT_DATASET_ERROR)
    console.print(f"intact: version {report.version} "
                  f"({'full check' if report.full else 'quick check'}, "
                  f"{report.hashed_files} files hashed)")


@dataset_app.command("release")
def dataset_release(
    directory: Path = typer.Argument(..., exists=True, file_okay=False),
    to: Path = typer.Option(..., "--to", help="The archive to write (.tar.gz)."),
) -> None:
    """Package inputs, ground truth, manifest and a data card as open data."""
    from engine.datasets import DatasetError, release

    try:
        release(directory, to)
    except DatasetError as exc:
        _error(exc)
        raise typer.Exit(EXIT_DATASET_ERROR) from None
    console.print(Text(f"released {directory} as {to}"))


@app.command()
def demo(sandbox: bool = typer.Option(False, "--sandbox", help="Show hostile images being "
                                      "contained instead.")) -> None:
    """A whole challenge on this machine: build the examples, seal a test set, submit,
    evaluate, and print the leaderboard with each failure's typed reason."""
    from engine.demo import run_demo, run_sandbox_demo
    from runners.docker import DockerUnavailable

    try:
        (run_sandbox_demo if sandbox else run_demo)(console, REPO_ROOT)
    except DockerUnavailable as exc:
        _error(exc)
        raise typer.Exit(EXIT_NO_ENGINE) from None


def _sessions():
    from engine.config import load_settings
    from engine.db import session_factory

    settings = load_settings()
    return settings, session_factory(settings.database_url)


def _fail(message: str, code: int = 1):
    _error(message)
    raise typer.Exit(code)


@challenge_app.command("create")
def challenge_create(
    file: Path = typer.Argument(..., exists=True, dir_okay=False),
    force: bool = typer.Option(False, "--force", help="Apply a change to a challenge whose "
                               "phases already have submissions (it is recorded)."),
) -> None:
    """Create or update a challenge from its YAML file (its datasets must be sealed). The
    whole file is checked first; nothing is registered when any of it is wrong."""
    from engine.challenges import ChallengeError
    from engine.submissions import SubmissionRefused, register_challenge

    _, sessions = _sessions()
    with sessions() as session:
        try:
            row = register_challenge(session, file, f"cli ({os.environ.get('USER', 'unknown')})",
                                     force=force)
            session.commit()
        except (ChallengeError, SubmissionRefused) as exc:
            _fail(str(exc))
        phases = ", ".join(f"{p.slug} ({len(p.case_ids)} cases)" for p in row.phases)
        console.print(Text.assemble("challenge ", (row.id, "bold"),
                                    f": {row.title}; phases: {phases}"))


@challenge_app.command("schema")
def challenge_schema(
    output_format: str = typer.Option("markdown", "--format", help="markdown (the reference, "
                                      "as in docs/challenge-file.md) or json (JSON Schema)."),
) -> None:
    """Every field of a challenge file: type, default, unit, allowed values and meaning."""
    from engine.challenge_schema import json_schema, markdown

    if output_format not in ("markdown", "json"):
        raise typer.BadParameter("--format is markdown or json")
    print(markdown() if output_format == "markdown" else json_schema(), end="")


def _byte_progress(progress, description: str):
    task = progress.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    return update


@app.command()
def submit(
    image: str = typer.Argument(..., help="A `docker save` tar, or a local image reference."),
    challenge: str = typer.Option(..., "--challenge", "-c"),
    phase: str = typer.Option(..., "--phase", "-p"),
    team: str = typer.Option("local", "--team", "-t"),
    source_url: str | None = typer.Option(None, help="Public URL of the code (prizes)."),
    license_id: str | None = typer.Option(None, "--license", help="SPDX license of the code."),
) -> None:
    """Submit an image to a phase: validated, pinned, queued (smoke job first)."""
    import tempfile

    import docker
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from engine.images import ImageInvalid, pin_tar, save_image
    from engine.submissions import SubmissionRefused, find_phase
    from engine.submissions import submit as make_submission

    settings, sessions = _sessions()
    client = docker.DockerClient(base_url=os.environ.get("DOCKER_HOST")
                                 or "unix:///var/run/docker.sock")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with sessions() as session:
        try:
            image_size = find_phase(session, challenge, phase)[1].limits.image_size
        except (SubmissionRefused, KeyError, ValueError) as exc:
            _fail(str(exc))
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as scratch:
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                tar = Path(image)
                reference = None
                if not tar.is_file():
                    reference = image
                    tar = save_image(image, Path(scratch) / "image.tar", client,
                                     _byte_progress(progress, f"saving {escape(image)}"))
                pinned = pin_tar(tar, client, reference=reference, max_image_bytes=image_size,
                                 work_dir=Path(scratch),
                                 progress=_byte_progress(progress, "checking the archive"),
                                 load_progress=_byte_progress(progress, "loading the image"))
        except ImageInvalid as exc:
            _fail(f"IMAGE_INVALID: {exc}")
        with sessions() as session:
            try:
                submission = make_submission(session, challenge, phase, team, pinned,
                                             source_url=source_url, license_id=license_id)
                session.commit()
            except SubmissionRefused as exc:
                _fail(str(exc))
            console.print(f"submission [bold]{submission.id}[/bold] queued "
                          f"(image {pinned.image_id[:19]}, archive sha256 "
                          f"{pinned.tar_sha256[:12]})")
            if not submission.prize_eligible:
                console.print(Text(submission.prize_note, style="yellow"))


@app.command()
def worker(
    until_idle: bool = typer.Option(False, "--until-idle", help="Stop when the queue is empty."),
    max_jobs: int | None = typer.Option(None, help="Stop after this many jobs."),
    lease_seconds: float = typer.Option(60, help="Lease length; heartbeats renew it."),
    heartbeat_seconds: float = typer.Option(10, help="Seconds between heartbeats."),
) -> None:
    """Run jobs from the queue until stopped (Ctrl-C), or until idle."""
    import signal
    import threading
    from datetime import timedelta

    from engine.worker import Worker
    from runners import make_runner

    settings, sessions = _sessions()
    runner = make_runner(settings.runner, state_dir=settings.state_dir / "runs")
    agent = Worker(sessions, settings, runner, lease_duration=timedelta(seconds=lease_seconds),
                   heartbeat_seconds=heartbeat_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"{agent.actor}: {len(agent.gpus.uuids)} GPU(s); waiting for jobs")
    try:
        done = agent.run(stop, until_idle=until_idle, max_jobs=max_jobs)
    except KeyboardInterrupt:
        done = None
    console.print(f"worker stopped{'' if done is None else f' after {done} job(s)'}")


@app.command()
def status(
    submission_id: int | None = typer.Argument(None),
    participant: bool = typer.Option(False, "--participant", help="Show only what the "
                                     "participant may see in this phase."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The queue, or one submission: state, typed reason, position and ETA, results."""
    from engine.reports import queue_overview, submission_report

    _, sessions = _sessions()
    with sessions() as session:
        if submission_id is None:
            report = queue_overview(session)
        else:
            report = submission_report(session, submission_id, participant=participant)
            if report is None:
                _fail(f"no submission {submission_id}")
    if as_json:
        print(json.dumps(report, default=str))
        return
    from engine.reports import render

    render(console, report)


@app.command("cancel")
def cancel_command(
    submission_id: int = typer.Argument(...),
    why: str = typer.Option("", help="Recorded in the submission's history."),
) -> None:
    """Cancel a submission: queued jobs never run; a running container is stopped."""
    from engine.lifecycle import cancel
    from engine.submissions import SubmissionRefused

    _, sessions = _sessions()
    with sessions() as session:
        try:
            cancel(session, submission_id, f"cli ({os.environ.get('USER', 'unknown')})", why)
            session.commit()
        except SubmissionRefused as exc:
            _fail(str(exc))
    console.print(f"submission {submission_id} cancelled")


@app.command("leaderboard")
def leaderboard_command(
    challenge: str = typer.Argument(...),
    phase: str = typer.Argument(...),
    stability: int = typer.Option(0, help="Also resample cases this many times (seeded) and "
                                  "report how firm the ranking is (Kendall's tau)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A phase's ranking under the challenge's scheme, with failed-case counts and runtime."""
    from dataclasses import asdict

    from engine.leaderboard import leaderboard
    from engine.reports import render_leaderboard
    from engine.submissions import SubmissionRefused

    _, sessions = _sessions()
    firmness = None
    with sessions() as session:
        try:
            entries = leaderboard(session, challenge, phase)
            if stability:
                from engine.leaderboard import stability as rank_stability

                firmness = rank_stability(session, challenge, phase, resamples=stability)
        except (SubmissionRefused, ValueError) as exc:
            _fail(str(exc))
    if as_json:
        print(json.dumps({"entries": [asdict(e) for e in entries], "stability": firmness}))
        return
    render_leaderboard(console, challenge, phase, entries)
    if firmness:
        console.print(f"ranking stability over {firmness['resamples']} bootstrap samples of "
                      f"cases: Kendall's tau mean {firmness['kendall_tau_mean']:.3f}, median "
                      f"{firmness['kendall_tau_median']:.3f}")
        for team, frequencies in firmness["rank_frequencies"].items():
            shares = ", ".join(f"#{r}: {f:.0%}" for r, f in sorted(frequencies.items()))
            console.print(Text(f"  {team}: {shares}"))


@app.command()
def check(
    image: str = typer.Argument(..., help="Your image (a local reference)."),
    challenge: str = typer.Option(..., "--challenge", "-c"),
    phase: str | None = typer.Option(None, "--phase", "-p", help="Default: the first phase."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A dry run on the phase's public sample cases, in exactly the sandbox and limits of
    the real phase: reports what the platform would report."""
    from engine.check import dry_run
    from engine.reports import render_check
    from engine.submissions import SubmissionRefused
    from runners.docker import DockerUnavailable

    settings, sessions = _sessions()
    with sessions() as session:
        try:
            report = dry_run(session, settings, image, challenge, phase)
        except SubmissionRefused as exc:
            _fail(str(exc))
        except DockerUnavailable as exc:
            _fail(str(exc), EXIT_NO_ENGINE)
    if as_json:
        print(json.dumps(report, default=str))
    else:
        render_check(console, report)
    raise typer.Exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    app()
