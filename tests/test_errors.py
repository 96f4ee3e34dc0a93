"""The error family: each expected failure maps once to an exit code and an HTTP status,
and the pure layers stay free of the Docker SDK while they import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.challenges import ChallengeError
from engine.datasets import DatasetError
from engine.errors import EpreuveError, exit_code, expected, http_status
from engine.images import ImageInvalid
from engine.medio import MedioError
from engine.queue import LeaseLost
from engine.submissions import ChallengeChanged, SubmissionRefused
from gpu.allocator import NotEnoughGPUs
from runners.base import InvalidRunSpec
from runners.docker import DockerUnavailable


@pytest.mark.parametrize(("error", "code", "status"), [
    (ChallengeError("line 3, limits.cpus: 0 is outside 0.01 to 256"), 1, 422),
    (DatasetError("not sealed"), 1, 422),
    (MedioError("cannot be read"), 1, 422),
    (ImageInvalid("runs as root"), 1, 422),
    (SubmissionRefused("quota used"), 1, 409),
    (ChallengeChanged("has submissions"), 1, 409),
    (LeaseLost("taken back"), 1, 409),
    (DockerUnavailable("no engine"), 3, 503),
    (NotEnoughGPUs("1 wanted, 0 free"), 3, 503),
    (InvalidRunSpec("timeout nan"), 2, 422),
])
def test_each_expected_failure_has_one_exit_code_and_status(error, code, status):
    assert expected(error)
    assert (exit_code(error), http_status(error)) == (code, status)


def test_an_unexpected_exception_is_not_in_the_family():
    bug = KeyError("a bug")
    assert not expected(bug) and not isinstance(bug, EpreuveError)
    assert http_status(bug) == 500


def test_the_pure_layers_import_no_docker():
    probe = ("import sys, engine.errors, engine.medio, engine.scoring.segmentation, "
             "engine.scoring.surface; print(sorted(m for m in ('docker', 'sqlalchemy') "
             "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_the_runner_backend_is_a_setting(tmp_path):
    from runners import UnknownBackend, make_runner
    from runners.docker import DockerRunner

    assert isinstance(make_runner("docker", state_dir=tmp_path / "runs"), DockerRunner)
    with pytest.raises(UnknownBackend) as unknown:
        make_runner("kubernetes")
    assert str(unknown.value) == "unknown runner backend 'kubernetes'; known: docker"
    assert (exit_code(unknown.value), http_status(unknown.value)) == (2, 422)


def test_an_unknown_backend_is_an_error_line_from_the_worker_command(tmp_path):
    env = {"EPREUVE_DATA_DIR": str(tmp_path), "EPREUVE_RUNNER": "kubernetes",
           "PATH": "/usr/bin:/bin"}
    epreuve = str(Path(sys.executable).parent / "epreuve")
    done = subprocess.run([epreuve, "worker", "--until-idle"], env=env, capture_output=True,
                          text=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: unknown runner backend 'kubernetes'; known: docker\n"
