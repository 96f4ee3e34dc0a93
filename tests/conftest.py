"""Shared fixtures: a real Docker Engine, the offline-built adversarial images, a runner.

Tests marked `docker` fail (never skip) when no engine answers: CI must not pass
by silently testing nothing. scripts/test starts the engine before pytest runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis.database import DirectoryBasedExampleDatabase
from sqlalchemy import create_engine, text

from engine.db import session_factory

REPO = Path(__file__).resolve().parent.parent

# Hypothesis remembers failing examples, outside the source tree (tests write nothing there)
hypothesis_settings.register_profile("epreuve", database=DirectoryBasedExampleDatabase(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "epreuve" / "hypothesis"))
hypothesis_settings.load_profile("epreuve")
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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Iterator[Callable[[str], Path]]:
    """Directories that live as long as one module's tests, removed once they all passed.

    A whole run saves image archives worth tens of GB; kept to the session's end they
    filled CI's disk. A module with a failure keeps its directories to be read."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def runner(docker_engine, tmp_path_factory):
    from runners.docker import DockerRunner

    return DockerRunner(state_dir=tmp_path_factory.mktemp("runner-state"))


def postgres_sessions():
    """A session factory on a clean schema of the test PostgreSQL server (scripts/test
    starts it and exports EPREUVE_TEST_POSTGRES_URL): failing in CI without one."""
    url = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("EPREUVE_TEST_POSTGRES_URL is not set: scripts/test starts PostgreSQL")
        pytest.skip("no PostgreSQL: run scripts/start-postgres, set EPREUVE_TEST_POSTGRES_URL")
    engine = create_engine(url)
    with engine.begin() as connection:  # a clean schema for every test
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return session_factory(url)
