"""A small challenge on disk and the images to submit to it, shared by the engine tests."""

from __future__ import annotations

import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import docker

from engine.config import Settings
from engine.datasets import seal
from engine.db import session_factory
from engine.images import PinnedImage, pin_tar
from engine.store import BlobStore, DirectoryStore
from engine.submissions import register_challenge
from engine.synthetic import synth_dataset
from tests.conftest import REPO, build_image

CHALLENGE_YAML = """
id: {id}
title: Test challenge
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}}
metrics: {{labels: [1, 2], nsd_tolerance_mm: 4.0}}
ranking:
  scheme: {scheme}
  metrics: [{{metric: dice, label: 1}}, {{metric: hd95, label: 1}}]
phases:
  - id: validation
    dataset: {{path: data/validation}}
    quota: {{submissions: {quota}, per: 1d}}
    cases_per_run: {cases_per_run}
    limits: {{memory: 1g, cpus: 1, time_per_case: {time_per_case}, output_quota: 64m}}
    visibility: {{logs: true, per_case: true}}
    sample_cases: [case-001]
  - id: final
    final: true
    dataset: {{path: data/final}}
    cases_per_run: 2
    limits: {{memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}}
    prize: {{requires_open_source: true}}
  - id: closed
    dataset: {{path: data/validation}}
    closes: 2020-01-01T00:00:00Z
"""


@dataclass
class Scene:
    root: Path
    settings: Settings
    sessions: object
    challenge_file: Path


def make_scene(root: Path, *, challenge_id: str = "test-liver", quota: int = 10,
               cases_per_run: int = 1, time_per_case: str = "60s",
               scheme: str = "rank-then-aggregate", validation_cases: int = 3,
               database_url: str | None = None) -> Scene:
    data = root / "data"
    if not (data / "validation" / "manifest.json").exists():
        synth_dataset(data / "validation", cases=validation_cases, seed=21, size=32)
        synth_dataset(data / "final", cases=4, seed=22, size=32)
        seal(data / "validation")
        seal(data / "final")
    challenge_file = root / f"{challenge_id}.yaml"
    challenge_file.write_text(CHALLENGE_YAML.format(
        id=challenge_id, quota=quota, cases_per_run=cases_per_run, scheme=scheme,
        time_per_case=time_per_case))
    state = root / "state"
    settings = Settings(data_dir=state,
                        database_url=database_url or f"sqlite:///{state / 'epreuve.db'}",
                        state_dir=state / "runner")
    return Scene(root, settings, session_factory(settings.database_url), challenge_file)


def build_examples(tmp: Path) -> dict[str, str]:
    """The example images, plus two test-only variants built on the threshold one."""
    images = {
        "threshold": build_image(REPO / "images/examples/threshold",
                                 "epreuve-example/threshold:latest"),
        "broken": build_image(REPO / "images/examples/broken", "epreuve-example/broken:latest"),
    }
    variants = {
        "no-smoothing": 'FROM epreuve-example/threshold:latest\nCMD ["--no-smoothing"]\n',
        "slow": textwrap.dedent("""\
            FROM epreuve-example/threshold:latest
            ENTRYPOINT ["sh", "-c", "sleep 20; exec python3 /opt/algorithm/segment.py"]
        """),
        "wrong-name": textwrap.dedent("""\
            FROM epreuve-example/threshold:latest
            ENTRYPOINT ["sh", "-c", "python3 /opt/algorithm/segment.py && for d in /output/*/; \\
                do mv $d/mask.nii.gz $d/prediction.nii.gz; done"]
        """),
    }
    for name, dockerfile in variants.items():
        directory = tmp / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "Dockerfile").write_text(dockerfile)
        subprocess.run(["docker", "build", "-q", "--network", "none", "-t",
                        f"epreuve-test/{name}:latest", str(directory)], check=True,
                       capture_output=True, env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:"
                                                 "/usr/local/bin:/bin"})
        images[name] = f"epreuve-test/{name}:latest"
    return images


def pin(reference: str, tmp: Path, store: BlobStore | None = None) -> PinnedImage:
    """`docker save` then intake; the archive kept in `store` (by default one under `tmp`:
    pass the scene's, `open_store(settings.store_dir)`, where a worker must load it)."""
    tar = tmp / (reference.replace("/", "_").replace(":", "_") + ".tar")
    if not tar.exists():
        subprocess.run(["docker", "save", reference, "-o", str(tar)], check=True)
    return pin_tar(tar, docker.DockerClient(base_url="unix:///var/run/docker.sock"),
                   store=store or DirectoryStore(tmp / "store"), reference=reference)


def script_image(base: str, script: str, tag: str, context: Path, *args: str) -> str:
    """An image that runs `script` (python3) on top of `base`: built offline, no network.
    `args` are passed to the script by the image's CMD."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "script.py").write_text(script)
    command = ", ".join(f'"{part}"' for part in ("python3", "/opt/script.py", *args))
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY script.py /opt/script.py\nCMD [{command}]\n")
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return tag


def sqlite_settings(state: Path) -> Settings:
    """The embedded default under `state`: SQLite, runner state and outputs all inside it."""
    return Settings(data_dir=state, database_url=f"sqlite:///{state}/epreuve.db",
                    state_dir=state / "state")


def registered_scene(root: Path, monkeypatch, challenge: str, *, cases: int, size: int):
    """A sealed synthetic dataset at root/data, `challenge` registered on SQLite, and the
    CLI pointed at the same data dir: (root, settings, sessions)."""
    synth_dataset(root / "data", cases=cases, seed=5, size=size)
    seal(root / "data")
    (root / "challenge.yaml").write_text(challenge)
    settings = sqlite_settings(root / "state")
    monkeypatch.setenv("EPREUVE_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("EPREUVE_DATABASE_URL", raising=False)
    sessions = session_factory(settings.database_url)
    with sessions() as session:
        register_challenge(session, root / "challenge.yaml")
        session.commit()
    return root, settings, sessions


def cli_status(*args: str) -> str:
    """`epreuve status ...` in process; it must succeed."""
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, ["status", *args])
    assert result.exit_code == 0, result.output
    return result.output
