"""images/build.sh builds offline from a copy of the context: the directory it is given,
the source tree included, is left exactly as it was (no wheels/ written into it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, build_image

pytestmark = pytest.mark.docker


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def test_a_build_writes_nothing_into_its_context(docker_engine, tmp_path):
    context = tmp_path / "evaluator"
    shutil.copytree(REPO / "images/examples/evaluator", context)
    before, tree = snapshot(context), snapshot(REPO / "images")
    tag = build_image(context, "epreuve-test/evaluator-copy:latest")
    assert snapshot(context) == before  # no wheels/ (they are downloaded into a cache)
    assert snapshot(REPO / "images") == tree
    packages = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint",
                               "python3", tag, "-c", "import nibabel, numpy; "
                               "print(nibabel.__version__, numpy.__version__)"],
                              check=True, capture_output=True, text=True).stdout
    assert packages == "5.3.2 2.2.6\n"  # requirements.txt's pins, installed offline
