"""Shared fixtures: a real Docker Engine, the offline-built adversarial images, a runner.

Tests marked `docker` fail (never skip) when no engine answers: CI must not pass
by silently testing nothing. scripts/test starts the engine before pytest runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ADVERSARIAL_TARGETS = ("probe", "nvidia-env", "root-user", "no-command")


def build_image(directory: Path, tag: str, *extra: str) -> str:
    subprocess.run([str(REPO / "images" / "build.sh"), str(directory), tag, *extra],
                   check=True, capture_output=True, text=True)
    return tag


@pytest.fixture(scope="session")
def docker_engine() -> None:
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("no Docker Engine answers: run scripts/ensure-docker (scripts/test does)")


@pytest.fixture(scope="session")
def adversarial(docker_engine) -> dict[str, str]:
    """Tag of each adversarial image, keyed by its Dockerfile stage."""
    return {
        target: build_image(REPO / "images" / "adversarial", f"epreuve-test/{target}:latest",
                            "--target", target)
        for target in ADVERSARIAL_TARGETS
    }


@pytest.fixture(scope="session")
def runner(docker_engine, tmp_path_factory):
    from runners.docker import DockerRunner

    return DockerRunner(state_dir=tmp_path_factory.mktemp("runner-state"))
