"""The `epreuve` command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from engine.errors import EXIT_NO_ENGINE
from engine.rendering import (
    FORMAT_HELP,
    Format,
    PipeAwareConsole,
    chosen_format,
    show,
    terminal_text,
    unwrap_help,
)
from engine.units import parse_size
from runners.base import RunSpec


class _ExpectedFailures(TyperGroup):
    """The one place where an expected failure becomes an error line and an exit code
    (engine/errors.py): a user never sees a traceback for one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unwrap_help(self)  # the source's hard wraps are no line breaks in --help

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
store_app = typer.Typer(help="The image store: what it keeps, and removing the rest (gc).",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")
token_app = typer.Typer(help="API tokens: create (shown once), list, revoke.",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")
nodes_app = typer.Typer(help="The nodes that run jobs; retiring one gone for good.",
                        invoke_without_command=True)
app.add_typer(nodes_app, name="nodes")

console = PipeAwareConsole()
errors = PipeAwareConsole(stderr=True)

EXIT_FAILED_RUN = 1
# A node whose runtime failed a run claims nothing for this long (doubling while it fails):
# a restarting Docker daemon still answers while it stops its containers.
PLATFORM_PAUSE_SECONDS = 15.0


def _error(message: object) -> None:
    """An error line: the message is text (it may quote a file, an image or a log), never
    rich markup."""
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
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object "
                                 "(as --format json)."),
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
    output_format = chosen_format(output_format, as_json)
    try:
        if output_format != Format.TABLE:
            result = runner.run(spec, cancel)
        else:
            with console.status(f"running {escape(image)} (limit {timeout:g} s)"):
                result = runner.run(spec, cancel)
    except KeyboardInterrupt:  # the runner has already removed the container
        cancel.set()
        raise typer.Exit(130) from None
    from engine.rendering import run_result_blocks

    show(console, output_format, result.to_dict(), run_result_blocks)
    raise typer.Exit(0 if result.succeeded else EXIT_FAILED_RUN)


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
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {label: {metric: value}} (as "
                                 "--format json)."),
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
    from engine.rendering import score_blocks

    title = (f"{prediction.name} vs {reference.name} (spacing "
             f"{', '.join(f'{s:.3g}' for s in ref.spacing)} mm)")
    show(console, chosen_format(output_format, as_json),
         {str(label): values for label, values in scores.items()},
         lambda data: score_blocks(data, title))


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
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
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
    from dataclasses import asdict

    from engine.rendering import verification_blocks

    show(console, output_format, {**asdict(report), "ok": report.ok}, verification_blocks)
    if not report.ok:
        errors.print(Text(terminal_text(f"{source} does not match its seal "
                                        f"({report.version[:12]})"), style="red"))
        raise typer.Exit(EXIT_DATASET_ERROR)


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


# `submit`, `status`, `leaderboard` and `cancel` go through a server's API when one is named
SERVER_OPTION = typer.Option(None, "--server", envvar="EPREUVE_SERVER",
                             help="Go through this Épreuve server's API instead of the local "
                                  "engine (submit: the upload resumes).")
TOKEN_OPTION = typer.Option(None, "--token", envvar="EPREUVE_TOKEN",
                            help="Your token for --server.")


@contextlib.contextmanager
def _api(server: str, token: str | None):
    """An API session for one command; a 404 reads as such (a submission of another team
    is not found either: the server never says whether it exists)."""
    from engine.client import Api, ApiError

    if not token:
        _fail("--server needs a token: --token or EPREUVE_TOKEN", 2)
    try:
        with Api(server, token) as api:
            yield api
    except ApiError as exc:
        if not exc.not_found:
            raise
        _fail(f"not found: {exc} (or not visible to this token)")


def report_from_api(detail: dict) -> dict:
    """A submission as the API details it, in the shape of engine.reports.submission_report
    (what the renderers read): the server has already cut it to what the token may see."""
    report = {"submission": detail["id"], **{key: detail.get(key) for key in (
        "team", "challenge", "phase", "status", "reason", "message", "created_at",
        "finished_at", "prize_eligible", "prize_note", "image")},
        "jobs": detail.get("jobs") or [], "aggregates": detail.get("aggregates") or {}}
    if detail.get("queue"):
        report["queue"] = detail["queue"]
    if detail.get("events") is not None:
        report["events"] = detail["events"]
    return report


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
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """Submit an image to a phase: validated, pinned, queued (smoke job first)."""
    if server:
        _submit_to_server(server, token, image, challenge, phase, source_url, license_id)
        return
    import tempfile

    import docker
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from engine.images import ImageInvalid, pin_tar, save_image
    from engine.store import open_store
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
                pinned = pin_tar(tar, client, store=open_store(settings.store_dir),
                                 reference=reference, max_image_bytes=image_size,
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


def _submit_to_server(server: str, token: str | None, image: str, challenge: str, phase: str,
                      source_url: str | None, license_id: str | None) -> None:
    """`submit` through the API: upload (resumed when interrupted), then the server's check
    of the image, followed here until it ends. The team is the token's."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from engine.client import Api, upload_image
    from engine.config import load_settings

    if not token:
        _fail("--server needs a token: --token or EPREUVE_TOKEN", 2)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        intake = upload_image(server, token, image, challenge, phase,
                              state_dir=load_settings().data_dir / "client",
                              progress=_byte_progress(progress, "uploading"),
                              save_progress=_byte_progress(progress, f"saving {escape(image)}"),
                              source_url=source_url, license_id=license_id)
        console.print(f"uploaded (sha256 {intake['archive_sha256'][:12]}); the server is "
                      f"checking the image (intake {intake['id']})")
        with Api(server, token) as api:
            intake = api.wait_for_intake(intake["id"], _byte_progress(
                progress, "checked by the server"))
    if intake["status"] != "accepted":
        _fail(f"{intake['reason'] or 'REFUSED'}: {intake['message']}")
    console.print(f"submission [bold]{intake['submission_id']}[/bold] "
                  f"{intake['submission_status']}")


@app.command()
def worker(
    until_idle: bool = typer.Option(False, "--until-idle", help="Stop when the queue is empty "
                                    "and none of this node's runs is still being scored."),
    max_jobs: int | None = typer.Option(None, help="Stop after this many jobs."),
    lease_seconds: float = typer.Option(60, help="Lease length; heartbeats renew it (local "
                                        "worker: a remote one gets the server's)."),
    heartbeat_seconds: float = typer.Option(10, help="Seconds between heartbeats."),
    server: str | None = typer.Option(None, "--server", envvar="EPREUVE_SERVER",
                                      help="Take jobs from this server over HTTP (a remote "
                                      "node: no database, no shared disk)."),
    token: str | None = typer.Option(None, "--token", envvar="EPREUVE_TOKEN",
                                     help="A worker token (`epreuve token create --role "
                                     "worker`), with --server."),
    gpus: str = typer.Option("all", "--gpus", help="GPUs this worker may use: all, a count, "
                             "or UUIDs separated by commas."),
    poll_seconds: float = typer.Option(20, "--poll-seconds", help="With --server: how long "
                                       "one claim waits for a job (long poll, at most 30)."),
    node_name: str | None = typer.Option(None, "--node-name", envvar="EPREUVE_NODE_NAME",
                                         help="This node's name in the registry (default: "
                                         "the host name)."),
    cpu_slots: int = typer.Option(1, "--cpu-slots", min=0, help="Jobs needing no GPU run "
                                  "at once in this many slots (GPU jobs: one per GPU). One "
                                  "by default: a job may use several cores, and GPU jobs "
                                  "need the node's CPUs to feed them."),
) -> None:
    """Run jobs from the queue until stopped (Ctrl-C), or until idle."""
    import signal
    import threading
    from datetime import timedelta

    from runners import make_runner

    chosen = _chosen_gpus(gpus)
    if server:
        if not token:
            _fail("--server needs a worker token: --token or EPREUVE_TOKEN", 2)
        import logging

        from engine.config import load_settings
        from engine.worker.http import HttpCoordinator, RemoteAgent

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        settings = load_settings()  # the node's own data dir: its database is never opened
        runner = make_runner(settings.runner, state_dir=settings.state_dir / "runs")
        coordinator = HttpCoordinator(server, token, wait_seconds=min(poll_seconds, 30.0))
        agent = RemoteAgent(coordinator, runner, settings, gpus=chosen,
                            heartbeat_seconds=heartbeat_seconds, node_name=node_name,
                            platform_pause_seconds=PLATFORM_PAUSE_SECONDS,
                            cpu_slots=cpu_slots)
    else:
        from engine.worker import Worker

        settings, sessions = _sessions()
        runner = make_runner(settings.runner, state_dir=settings.state_dir / "runs")
        agent = Worker(sessions, settings, runner,
                       lease_duration=timedelta(seconds=lease_seconds),
                       heartbeat_seconds=heartbeat_seconds, gpus=chosen, node_name=node_name,
                       platform_pause_seconds=PLATFORM_PAUSE_SECONDS, cpu_slots=cpu_slots)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"{agent.actor}: {len(agent.gpus.uuids)} GPU slot(s), {cpu_slots} CPU "
                  "slot(s); waiting for jobs"
                  + (f" from {server}" if server else ""))
    try:
        done = agent.run(stop, until_idle=until_idle, max_jobs=max_jobs)
    except KeyboardInterrupt:
        done = None
    console.print(f"worker stopped{'' if done is None else f' after {done} job(s)'}")


def _chosen_gpus(text: str) -> list[str] | None:
    """--gpus: None (every GPU of the node), the first N, or the UUIDs given."""
    value = text.strip()
    if value == "all":
        return None
    if value.isdigit():
        from gpu.inventory import list_gpus

        found = [g.uuid for g in list_gpus()]
        if int(value) > len(found):
            _fail(f"--gpus {value}: this node has {len(found)} GPU(s)", 2)
        return found[:int(value)]
    uuids = [part.strip() for part in value.split(",") if part.strip()]
    if not uuids or not all(re.fullmatch(r"[A-Za-z0-9-]{1,100}", u) for u in uuids):
        _fail("--gpus takes all, a count, or GPU UUIDs separated by commas", 2)
    return uuids


@nodes_app.callback()
def nodes_command(
    context: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="As JSON."),
    retired: bool = typer.Option(False, "--retired", help="Retired nodes too."),
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """The nodes that run jobs: slots, GPUs and their latest readings, last heartbeat,
    state (active | lost), running jobs (an organiser's or admin's token with --server)."""
    if context.invoked_subcommand is not None:  # `nodes --server URL retire 7`: for it
        if as_json or retired:
            _fail("--json and --retired list the nodes: give them without a subcommand", 2)
        context.obj = {"server": server, "token": token}
        return
    if server:
        with _api(server, token) as api:
            views = api.nodes(retired=retired)
    else:
        from engine.nodes import node_views

        _, sessions = _sessions()
        with sessions() as session:
            views = node_views(session, include_retired=retired)
    if as_json:
        console.print_json(json.dumps(views))
        return
    console.print(nodes_table(views))


@nodes_app.command("retire")
def nodes_retire(
    context: typer.Context,
    node_id: int = typer.Argument(..., min=1, help="The node's id (`epreuve nodes`)."),
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """Take a node gone for good out of the list and the "node lost" alert (an admin's
    token with --server). Refused while jobs run there; it comes back if heard from."""
    given = context.obj or {}  # --server and --token may come before `retire`
    server, token = server or given.get("server"), token or given.get("token")
    if server:
        with _api(server, token) as api:
            name = api.retire_node(node_id)["name"]
    else:
        from engine.nodes import retire

        _, sessions = _sessions()
        with sessions() as session:
            name = retire(session, node_id, _actor()).name
            session.commit()
    console.print(f"node {node_id} ({escape(name)}) retired")


def nodes_table(views: list[dict]) -> Table:
    table = Table(title="nodes")
    for column in ("id", "node", "state", "slots gpu/cpu", "GPUs", "last heartbeat", "jobs"):
        table.add_column(column)
    for node in views:
        gpus = "\n".join(_gpu_line(gpu) for gpu in node["gpus"]) or "-"
        jobs = ", ".join(f"{j['job']} ({j['status']})" for j in node["jobs"]) or "-"
        table.add_row(str(node["id"]), escape(node["name"]), node["state"],
                      f"{node['slots']['gpu']}/{node['slots']['cpu']}", escape(gpus),
                      f"{node['last_heartbeat']} ({node['seconds_since_heartbeat']:.0f}s ago)",
                      jobs)
    return table


def _gpu_line(gpu: dict) -> str:
    line = f"{gpu['model']} {gpu['memory_bytes'] >> 20} MiB, driver {gpu['driver']}"
    sample = gpu.get("sample")
    if sample:
        energy = sample.get("energy_millijoules")
        line += (f": {sample['utilisation_percent']:.0f}%, {sample['memory_used_mib']:.0f} "
                 f"MiB, {sample['power_watts']:.0f} W"
                 + ("" if energy is None else f", {energy / 3.6e6:.3f} kWh"))
    return line


@app.command()
def status(
    submission_id: int | None = typer.Argument(None),
    participant: bool = typer.Option(False, "--participant", help="Show only what the "
                                     "participant may see in this phase."),
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="As --format json."),
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """The queue, or one submission: state, typed reason, position and ETA, results."""
    from engine.rendering import status_blocks
    from engine.reports import queue_overview, submission_report

    if server:
        if submission_id is None:
            _fail("with --server, name a submission: the queue is the organisers' view", 2)
        with _api(server, token) as api:
            report = report_from_api(api.submission(submission_id))
        show(console, chosen_format(output_format, as_json), report, status_blocks)
        return
    _, sessions = _sessions()
    with sessions() as session:
        if submission_id is None:
            report = queue_overview(session)
        else:
            report = submission_report(session, submission_id, participant=participant)
            if report is None:
                _fail(f"no submission {submission_id}")
    show(console, chosen_format(output_format, as_json), report, status_blocks)


@app.command("cancel")
def cancel_command(
    submission_id: int = typer.Argument(...),
    why: str = typer.Option("", help="Recorded in the submission's history (locally)."),
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """Cancel a submission: queued jobs never run; a running container is stopped."""
    from engine.lifecycle import cancel
    from engine.submissions import SubmissionRefused

    if server:
        with _api(server, token) as api:
            ended = api.cancel(submission_id)
        console.print(f"submission {ended['id']} {ended['status']}")
        return
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
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="As --format json."),
    server: str | None = SERVER_OPTION,
    token: str | None = TOKEN_OPTION,
) -> None:
    """A phase's ranking under the challenge's scheme, with failed-case counts and runtime."""
    from engine.leaderboard import leaderboard
    from engine.rendering import leaderboard_blocks, leaderboard_report
    from engine.submissions import SubmissionRefused

    if server:
        if stability:
            _fail("--stability resamples per-case results: run it on the server's side", 2)
        with _api(server, token) as api:
            board = {"challenge": challenge, "phase": phase,
                     "entries": api.leaderboard_entries(challenge, phase), "stability": None}
        show(console, chosen_format(output_format, as_json), board, leaderboard_blocks)
        return
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
    show(console, chosen_format(output_format, as_json),
         leaderboard_report(challenge, phase, entries, firmness), leaderboard_blocks)


@app.command("report")
def report_command(
    challenge: str = typer.Argument(..., help="The challenge's id."),
    phase: str = typer.Argument(..., help="The phase's id."),
    to: Path = typer.Option(..., "--to", dir_okay=False, help="The HTML file to write."),
    resamples: int = typer.Option(1000, min=0, help="Bootstrap samples of cases for the "
                                  "ranking-stability figures (0: none)."),
) -> None:
    """One self-contained HTML file for the challenge paper: the leaderboard with intervals,
    failed cases, runtime and energy, and the figures inline (it holds per-case results)."""
    from engine.challenge_report import build_report

    if not to.parent.is_dir():  # said before the figures are drawn, not after
        _fail(f"cannot write {to}: {to.parent} is not a directory")
    _, sessions = _sessions()
    with sessions() as session:  # an unknown challenge or phase: the expected-failure path
        html = build_report(session, challenge, phase, resamples=resamples)
    try:
        to.write_text(html, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {to}: {exc.strerror}")
    console.print(Text(f"report written to {to} ({len(html.encode()) // 1024} KiB); it holds "
                       "per-case results: share it with care"))


@app.command()
def rescore(
    challenge: str = typer.Argument(...),
    phase: str = typer.Argument(...),
    submission_id: int | None = typer.Option(None, "--submission", help="Only this "
                                             "submission (default: every evaluated one "
                                             "computed on an older dataset version)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-score stored outputs against the phase's current dataset version, without running
    a container, where each case's inputs did not change; list the cases that need a
    re-run (a submission with any is left as it is)."""
    from dataclasses import asdict

    from engine.rescore import rescore as rescore_phase
    from runners import make_runner

    settings, sessions = _sessions()
    with sessions() as session:
        outcomes = rescore_phase(
            session, settings, challenge, phase, submission_id=submission_id,
            actor=f"cli ({os.environ.get('USER', 'unknown')})",
            runner=lambda: make_runner(settings.runner, state_dir=settings.state_dir / "runs"))
        session.commit()
    if as_json:
        print(json.dumps([{**asdict(o), "done": o.done} for o in outcomes]))
        return
    if not outcomes:
        console.print("nothing to rescore: every evaluated submission is on the current "
                      "dataset version")
    for o in outcomes:
        head = f"submission {o.submission_id} ({o.team}): "
        if o.done:
            console.print(Text(head + f"rescored {len(o.rescored)} case(s) from stored outputs "
                               f"(dataset {o.old_version[:12]} -> {o.new_version[:12]})"))
            continue
        console.print(Text(head + f"not rescored: {len(o.needs_rerun)} case(s) need a re-run",
                           style="yellow"))
        for case_id, why in list(o.needs_rerun.items())[:20]:
            console.print(Text(f"  {case_id}: {why}"))


def _actor() -> str:
    return f"cli ({os.environ.get('USER', 'unknown')})"


@app.command()
def reproduce(
    target: str = typer.Argument(..., help="A submission's id (on this platform), or a "
                                 "bundle written by `epreuve export`."),
    data: Path | None = typer.Option(None, "--data", help="With a bundle: the released "
                                     "dataset (`dataset release`, extracted)."),
    build: Path | None = typer.Option(None, "--build", file_okay=False, help="Build the "
                                      "image from this published source (its Dockerfile) "
                                      "and compare it with the submitted image's results."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run a submission's image as it ran (its RunSpec, its dataset version) and compare
    each case with the recorded results. Exit status: 0 identical, 4 within the challenge's
    tolerance, 5 differs (1, 2, 3: refused, usage, no Docker Engine)."""
    from engine.config import load_settings
    from engine.reproduce import build_from_source, report, report_lines
    from runners import make_runner

    settings = load_settings()
    runner = make_runner(settings.runner, state_dir=settings.state_dir / "runs")
    built = None if build is None else build_from_source(build, runner)
    if target.isdigit():
        if data is not None:
            raise typer.BadParameter("--data goes with a bundle; a submission id is "
                                     "reproduced on the platform's own dataset")
        data_out = _reproduce_here(settings, int(target), runner, built)
    else:
        from engine.bundles import reproduce_bundle

        if data is None:
            raise typer.BadParameter("a bundle needs --data DIR: the released dataset")
        comparison, bundle = reproduce_bundle(Path(target), data, runner, settings.work_dir,
                                              built_image=built)
        data_out = report(comparison, submission_id=bundle.run.submission_id,
                          team=bundle.run.team, image_id=built or bundle.run.image_id)
    if as_json:
        print(json.dumps(data_out))
    else:
        for line in report_lines(data_out):
            console.print(Text(terminal_text(line)))
    raise typer.Exit(data_out["exit_code"])


def _reproduce_here(settings, submission_id: int, runner, built: str | None) -> dict:
    from engine.db import session_factory
    from engine.reproduce import report, reproduce_submission
    from engine.store import open_store

    sessions = session_factory(settings.database_url)
    with sessions() as session:
        comparison, row_id = reproduce_submission(
            session, settings, submission_id, runner, open_store(settings.store_dir),
            actor=_actor(), built_image=built)
        session.commit()
        from engine.db.models import SubmissionRow

        submission = session.get(SubmissionRow, submission_id)
        return report(comparison, submission_id=submission_id, team=submission.team.name,
                      image_id=built or submission.image.image_id, reproduction_id=row_id)


@app.command("export")
def export_command(
    submission_id: int = typer.Argument(...),
    to: Path = typer.Option(..., "--to", dir_okay=False, help="The bundle to write (.tar)."),
) -> None:
    """Write a finished submission's reproduction bundle: its image, the challenge, the
    dataset's manifest (not the data), its run specs, results and provenance, SHA256SUMS.
    `epreuve reproduce BUNDLE --data DIR` re-runs it anywhere."""
    from engine.bundles import export_bundle
    from engine.store import open_store

    settings, sessions = _sessions()
    with sessions() as session:
        path = export_bundle(session, open_store(settings.store_dir), submission_id, to)
    console.print(Text(f"bundle written to {path} ({path.stat().st_size // 1024} KiB); "
                       "reproduce it with: epreuve reproduce "
                       f"{path.name} --data RELEASED_DATASET_DIR"))


@challenge_app.command("freeze")
def challenge_freeze(
    challenge: str = typer.Argument(...),
    to: Path | None = typer.Option(None, "--to", file_okay=False, help="Where the final "
                                   "record goes (default: beside the data release, "
                                   "DATA_DIR/releases/CHALLENGE/final-record)."),
) -> None:
    """Close a challenge: write the final record (per-case results CSV, aggregates,
    rankings, provenance, SHA256SUMS) and freeze every phase: its results never change."""
    from engine.freeze import default_record_dir, freeze

    settings, sessions = _sessions()
    target = to or default_record_dir(settings.data_dir, challenge)
    with sessions() as session:
        written = freeze(session, challenge, target, actor=_actor())
        session.commit()
    console.print(Text(f"challenge {challenge} frozen; final record in {written}"))


@app.command()
def check(
    image: str = typer.Argument(..., help="Your image (a local reference)."),
    challenge: str = typer.Option(..., "--challenge", "-c"),
    phase: str | None = typer.Option(None, "--phase", "-p", help="Default: the first phase."),
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="As --format json."),
) -> None:
    """A dry run on the phase's public sample cases, in exactly the sandbox and limits of
    the real phase: reports what the platform would report."""
    from engine.check import dry_run
    from engine.rendering import check_blocks
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
    show(console, chosen_format(output_format, as_json), report, check_blocks)
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535),
    scorer: bool = typer.Option(True, "--scorer/--no-scorer", help="Score remote workers' "
                                "completions in this process (--no-scorer: `epreuve scorer` "
                                "runs apart)."),
) -> None:
    """Run the HTTP API and the browser pages (uvicorn) on the configured database: the
    embedded SQLite by default, PostgreSQL by EPREUVE_DATABASE_URL. /docs shows the API's
    routes; / is the challenges' pages."""
    import uvicorn

    from engine.api.app import ApiOptions
    from engine.config import load_settings
    from engine.web import create_site

    uvicorn.run(create_site(load_settings(), ApiOptions(scorer=scorer)), host=host, port=port,
                proxy_headers=False, server_header=False)


@app.command("scorer")
def scorer_command(
    until_idle: bool = typer.Option(False, "--until-idle", help="Stop when nothing waits "
                                    "for scoring."),
    lease_seconds: float = typer.Option(60, "--lease-seconds", min=1, help="The scoring "
                                        "lease; renewed while a job is scored."),
    poll_seconds: float = typer.Option(1, "--poll-seconds", min=0.05, help="How often to "
                                       "look for stored outcomes when idle."),
) -> None:
    """Score completed runs on the trusted side (validate the outputs, score them against
    the ground truth, write the results), beside `epreuve serve --no-scorer`. Any number
    may run; a scorer that dies leaves its job to the next."""
    import logging
    import signal
    import threading
    from datetime import timedelta

    from engine.worker.scorer import Scorer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings, sessions = _sessions()
    scorer = Scorer(sessions, settings, lease=timedelta(seconds=lease_seconds),
                    poll_seconds=poll_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), scorer.wake.set()))
    console.print(f"{scorer.owner}: waiting for runs to score")
    try:
        done = scorer.run(stop, until_idle=until_idle)
    except KeyboardInterrupt:
        done = None
    console.print(f"scorer stopped{'' if done is None else f' after {done} job(s)'}")


@store_app.command("gc")
def store_gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove "
                                 "nothing."),
    grace_days: float = typer.Option(30.0, "--grace-days", min=0.0, help="Remove a blob no "
                                     "rule keeps only once unused for this many days."),
    output_format: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="As --format json."),
) -> None:
    """Remove what the retention policy does not keep (docs/retention.md): images of final
    phases, ranked images and those of submissions not yet ended are always kept."""
    from datetime import timedelta

    from engine import retention
    from engine.rendering import gc_blocks
    from engine.store import open_store

    settings, sessions = _sessions()
    store = open_store(settings.store_dir)
    policy = retention.Policy(grace=timedelta(days=grace_days))
    with sessions() as session:
        gc_plan = retention.plan(session, store, policy)
    if not dry_run:
        retention.carry_out(store, gc_plan)
    show(console, chosen_format(output_format, as_json),
         retention.report(gc_plan, dry_run=dry_run, policy=policy), gc_blocks)


@token_app.command("create")
def token_create(
    role: str = typer.Option(..., "--role", help="admin, organiser, reviewer, participant or "
                             "worker."),
    team: str | None = typer.Option(None, "--team", help="The participant's team (created if "
                                    "needed)."),
    challenges: list[str] = typer.Option([], "--challenge", help="A challenge an organiser or "
                                         "reviewer token may manage or read (repeat it)."),
    expires: str | None = typer.Option(None, "--expires", help="Lifetime, e.g. 30d, 12h "
                                       "(default: never)."),
    note: str | None = typer.Option(None, "--note", help="Who or what it is for."),
) -> None:
    """Create a token. Its secret is printed once, as the last line: store it now."""
    from datetime import timedelta

    from engine.challenges import parse_duration
    from engine.tokens import create_token

    lifetime = None
    if expires is not None:
        try:
            lifetime = timedelta(seconds=parse_duration(expires))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expires") from None
    _, sessions = _sessions()
    with sessions() as session:
        row, secret = create_token(session, role, team=team, challenges=challenges,
                                   expires_in=lifetime, note=note)
        session.commit()
        console.print(f"token {row.id} ({row.role}"
                      + (f", team {escape(row.team.name)}" if row.team else "")
                      + (f", challenges {escape(', '.join(row.challenge_ids))}"
                         if row.challenge_ids else "")
                      + (f", expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at
                         else "") + "): shown once, store it now", soft_wrap=True)
    print(secret)


@token_app.command("revoke")
def token_revoke(token_id: int = typer.Argument(...)) -> None:
    """Revoke a token at once: its next request gets 401."""
    from engine.tokens import revoke_token

    _, sessions = _sessions()
    with sessions() as session:
        revoke_token(session, token_id)
        session.commit()
    console.print(f"token {token_id} revoked")


@token_app.command("list")
def token_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every token, without its secret: id, display prefix, role, team, scope, dates."""
    from engine.tokens import list_tokens

    _, sessions = _sessions()
    with sessions() as session:
        rows = [{"id": r.id, "prefix": r.prefix, "role": r.role,
                 "team": r.team.name if r.team else None, "challenges": r.challenge_ids,
                 "created_at": r.created_at, "expires_at": r.expires_at,
                 "revoked_at": r.revoked_at, "last_used_at": r.last_used_at, "note": r.note}
                for r in list_tokens(session)]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table(title="tokens")
    for column in ("id", "prefix", "role", "team", "challenges", "expires", "revoked",
                   "last used"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["id"]), f"{r['prefix']}...", r["role"], Text(r["team"] or "-"),
                      Text(", ".join(r["challenges"]) or "-"),
                      f"{r['expires_at']:%Y-%m-%d %H:%M}" if r["expires_at"] else "-",
                      f"{r['revoked_at']:%Y-%m-%d %H:%M}" if r["revoked_at"] else "-",
                      f"{r['last_used_at']:%Y-%m-%d %H:%M}" if r["last_used_at"] else "-")
    console.print(table)


if __name__ == "__main__":
    app()
