"""Variants of the hostile-archive attacks on image intake: each is refused with its reason.

An image config the runtime would refuse at start (a WorkingDir it cannot enter, an Env
it cannot set) is refused at intake, so that it never reaches a run where its failure to
start would pass for the platform's.
"""

from __future__ import annotations

import pytest

from engine.images import ImageInvalid, inspect_tar
from tests.test_image_intake_attacks import GROUP, PASSWD, archive, config_for, layer
from tests.test_runner_hostile_variants import UNSTARTABLE


@pytest.mark.parametrize("settings,message", UNSTARTABLE.values(), ids=UNSTARTABLE.keys())
def test_a_config_the_runtime_cannot_start_is_refused_at_intake(tmp_path, settings, message):
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    path = archive(tmp_path / "image.tar", layers=layers,
                   config=config_for(layers, "algo", **settings))
    with pytest.raises(ImageInvalid, match=message):
        inspect_tar(path)


@pytest.mark.parametrize("working_dir", ["", "/", "/app", "/input", "/output", "/tmp/work"])
def test_ordinary_working_dirs_are_accepted(tmp_path, working_dir):
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    path = archive(tmp_path / "image.tar", layers=layers,
                   config=config_for(layers, "algo", WorkingDir=working_dir,
                                     Env=["PATH=/usr/bin", "EMPTY=", "NOVALUE"]))
    assert inspect_tar(path).user.spec == "1000:1000"
