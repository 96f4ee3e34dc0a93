"""Variants of the hostile-archive attacks on image intake: each is refused with its reason.

A sparse entry stands for as many bytes as its header claims, and is written out whole
when it is copied or loaded: a few KiB of archive would fill the node's disk, past every
bound counted on the stream. Sparse entries are refused, in the archive and in a layer.

An image config the runtime would refuse at start (a WorkingDir it cannot enter, an Env
it cannot set) is refused at intake, so that it never reaches a run where its failure to
start would pass for the platform's.
"""

from __future__ import annotations

import io
import tarfile

import docker
import pytest

from engine.images import ImageInvalid, inspect_tar, pin_tar
from engine.store import DirectoryStore
from runners.image_user import resolve_user
from tests.test_image_intake_attacks import (
    GROUP,
    PASSWD,
    archive,
    config_for,
    entry,
    layer,
    tar_bytes,
)
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


# -- sparse entries ---------------------------------------------------------------------------

CLAIMED = 256 << 20  # what the entry expands to; its stream holds 1 KiB


def sparse_entry(name: str, realsize: int = CLAIMED):
    """A PAX 1.0 sparse file (what GNU tar writes with --sparse): one 512-byte data block
    at offset 0, then a hole up to `realsize`."""
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    data = b"1\n0\n512\n".ljust(512, b"\0") + b"x" * 512  # the map, then the data
    info.size, info.mode = len(data), 0o644
    return info, data


def test_a_sparse_file_in_a_layer_is_refused_before_the_daemon_expands_it(tmp_path):
    layers = [tar_bytes([entry("etc", kind=tarfile.DIRTYPE), entry("etc/passwd", PASSWD),
                         entry("etc/group", GROUP), sparse_entry("big")])]
    path = archive(tmp_path / "image.tar", layers=layers, config=config_for(layers, "algo"))
    client = docker.from_env()
    images_before = {image.id for image in client.images.list(all=True)}
    with pytest.raises(ImageInvalid, match=r"sparse file 'big'"):
        pin_tar(path, client, store=DirectoryStore(tmp_path / "store"), max_image_bytes=16 << 20,
                work_dir=tmp_path)
    assert {image.id for image in client.images.list(all=True)} <= images_before


def test_a_sparse_member_of_the_archive_is_refused_before_it_is_copied(tmp_path):
    with tarfile.open(archive(tmp_path / "base.tar")) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    path = archive(tmp_path / "image.tar", members=[*members, sparse_entry("pad.bin")])
    copy = tmp_path / "copy.tar"
    with pytest.raises(ImageInvalid, match=r"sparse file 'pad\.bin'"):
        inspect_tar(path, max_bytes=1 << 20, copy_to=copy)
    assert copy.stat().st_size < 1 << 20


def test_the_sparse_entry_of_these_tests_does_expand():
    """The attack is real: Python's reader (like Go's, which the daemon uses) expands it."""
    buffer = io.BytesIO(tar_bytes([sparse_entry("big")]))
    with tarfile.open(fileobj=buffer, mode="r|") as tar:
        member = tar.next()
        assert (member.size, len(buffer.getvalue())) == (CLAIMED, 10240)


# -- entries: inodes on the daemon's disk ---------------------------------------------------


def test_the_entries_of_all_layers_together_are_bounded(tmp_path, monkeypatch):
    """Each entry is an inode on the daemon's disk whatever its size: a bound per layer
    would let an image of many layers, each just under it, exhaust the disk's inodes."""
    import engine.images

    monkeypatch.setattr(engine.images, "MAX_IMAGE_ENTRIES", 8, raising=False)
    accounts = layer({"etc/passwd": PASSWD, "etc/group": GROUP})  # 3 entries
    empties = [layer({f"etc/empty-{n}-{i}": b"" for i in range(3)}) for n in range(2)]  # 4 each
    path = archive(tmp_path / "image.tar", layers=[accounts, *empties])
    with pytest.raises(ImageInvalid, match="the image's layers hold more than 8 entries"):
        inspect_tar(path)
    path = archive(tmp_path / "fits.tar", layers=[accounts, empties[0]])  # 7 entries
    assert inspect_tar(path).user.spec == "1000:1000"


@pytest.mark.parametrize("volume", ["//input", "//input/x", "//output/x", "//proc/x", "//dev"])
def test_a_volume_reaching_a_sandbox_mount_by_double_slash_is_refused_at_intake(tmp_path,
                                                                                volume):
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    path = archive(tmp_path / "image.tar", layers=layers,
                   config=config_for(layers, "algo", Volumes={volume: {}}))
    with pytest.raises(ImageInvalid, match=f"the image declares VOLUME '{volume}'"):
        inspect_tar(path)


# -- a config read one way by intake and another by the Docker Engine ---------------------

READ_OTHERWISE = {  # Go matches keys to fields regardless of case (Unicode folding), last wins
    "user in lower case": ({"user": "0:0"}, "User"),
    "volumes in lower case": ({"volumes": {"/input/x": {}}}, "Volumes"),
    "Volumes with a long s": ({"Volume\u017f": {"/input/y": {}}}, "Volumes"),
    "workingdir in lower case": ({"workingdir": "relative"}, "WorkingDir"),
    "ENTRYPOINT in upper case": ({"ENTRYPOINT": ["/bin/other"]}, "Entrypoint"),
}


@pytest.mark.parametrize("extra,field", READ_OTHERWISE.values(), ids=READ_OTHERWISE.keys())
def test_a_config_the_engine_reads_otherwise_is_refused_and_not_kept(tmp_path, extra, field):
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    config = config_for(layers, "algo")
    config["config"].update(extra)
    path = archive(tmp_path / "image.tar", layers=layers, config=config)
    image_id = inspect_tar(path).image_id  # intake alone sees nothing wrong
    client = docker.from_env()
    with pytest.raises(ImageInvalid, match=rf"reads differently to the Docker Engine \({field}\)"):
        pin_tar(path, client, store=DirectoryStore(tmp_path / "store"), work_dir=tmp_path)
    with pytest.raises(docker.errors.ImageNotFound):
        client.api.inspect_image(image_id)


# -- /etc/passwd read as runc reads it -----------------------------------------------------


@pytest.mark.parametrize("separator", ["\v", "\f", "\x1c", "\x1e", "\x85", "\u2028"])
def test_passwd_lines_end_at_newline_only_as_runc_reads_them(separator):
    """runc (Go's scanner) ends lines at \\n only: `x<sep>algo:...` is one line, for the user
    `x<sep>algo`; the `algo` runc finds is the next line's."""
    passwd = f"x{separator}algo:x:1000:1000::/:/bin/sh\nalgo:x:2000:2000::/:/bin/sh\n"
    assert resolve_user("algo", passwd, "").spec == "2000:2000"
