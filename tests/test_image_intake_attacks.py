"""Hostile `docker save` archives: each test is one attack on image intake.

Most archives are built here with tarfile (a config, small layers, a manifest),
so that every field can be made hostile; the ones that must reach the Docker
Engine are real images saved with `docker save`, then edited.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import subprocess
import tarfile
import uuid
from pathlib import Path

import docker
import pytest

from engine.images import ImageInvalid, inspect_tar, node_architecture, pin_tar
from engine.store import DirectoryStore
from runners.base import FailureReason, RunSpec
from runners.image_user import resolve_user

PASSWD = b"root:x:0:0::/root:/bin/sh\nalgo:x:1000:1000::/home/algo:/bin/sh\n"
GROUP = b"root:x:0:\nalgo:x:1000:\nstaff:x:50:\n"


# -- building archives ------------------------------------------------------------------------


def entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, data


def tar_bytes(entries, **open_args) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, **open_args) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def layer(files: dict[str, bytes] | None = None, *extra) -> bytes:
    """A layer tar: /etc with the given account files, plus any extra entries."""
    entries = [entry("etc", kind=tarfile.DIRTYPE)]
    entries += [entry(name, data) for name, data in (files or {}).items()]
    return tar_bytes(entries + list(extra))


COMPRESS = {"plain": lambda b: b, "gzip": gzip.compress, "bzip2": bz2.compress,
            "xz": lzma.compress}


def config_for(layers: list[bytes], user: str = "algo", **settings) -> dict:
    return {"architecture": node_architecture(), "os": "linux",
            "config": {"User": user, "Cmd": ["true"], **settings},
            "rootfs": {"type": "layers",
                       "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}


def archive(path: Path, *, layers: list[bytes] | None = None, user: str = "algo",
            compress: str = "plain", config: dict | bytes | None = None,
            manifest: list | dict | bytes | None = None, extra=(), members=None) -> Path:
    """A `docker save`-shaped archive; any part may be replaced by a hostile one."""
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})] if layers is None else layers
    config = config_for(layers, user) if config is None else config
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    if manifest is None:
        manifest = [{"Config": "config.json", "RepoTags": ["team/algo:1"], "Layers": names}]
    manifest_bytes = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    if members is None:
        members = [entry("config.json", config_bytes)]
        members += [entry(n, COMPRESS[compress](x)) for n, x in zip(names, layers, strict=True)]
        members += [entry("manifest.json", manifest_bytes)]
    path.write_bytes(tar_bytes(list(members) + list(extra)))
    return path


def refused(path: Path, match: str, **kwargs) -> None:
    with pytest.raises(ImageInvalid, match=match):
        inspect_tar(path, **kwargs)


def test_a_well_formed_archive_is_accepted_and_its_user_resolved_by_number(tmp_path):
    inspection = inspect_tar(archive(tmp_path / "ok.tar"))
    assert inspection.user.spec == "1000:1000"
    assert inspection.named_tags == ["team/algo:1"]


# -- manifest.json: links, duplicates, shapes ----------------------------------------------------


def test_a_symlinked_manifest_is_refused(tmp_path):
    base = archive(tmp_path / "base.tar")
    with tarfile.open(base) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != "manifest.json"]
        real = tar.extractfile("manifest.json").read()
    archive(tmp_path / "a.tar", members=[*kept,
        entry("other.json", real), entry("manifest.json", kind=tarfile.SYMTYPE,
                                         link="other.json")])
    refused(tmp_path / "a.tar", r"manifest\.json is not a regular file")
    archive(tmp_path / "h.tar", members=[*kept,
        entry("other.json", real), entry("manifest.json", kind=tarfile.LNKTYPE,
                                         link="other.json")])
    refused(tmp_path / "h.tar", r"manifest\.json is not a regular file")
    archive(tmp_path / "d.tar", members=[*kept, entry("manifest.json", kind=tarfile.DIRTYPE)])
    refused(tmp_path / "d.tar", r"manifest\.json is not a regular file")


@pytest.mark.parametrize("second_name", ["manifest.json", "./manifest.json", "/manifest.json",
                                         ".//manifest.json"])
def test_a_duplicated_manifest_is_refused(tmp_path, second_name):
    decoy = json.dumps([{"Config": "config.json", "Layers": []}]).encode()
    path = archive(tmp_path / "a.tar", extra=[entry(second_name, decoy)])
    refused(path, r"unsafe path|manifest\.json' twice")


def test_any_entry_twice_is_refused(tmp_path):
    path = archive(tmp_path / "a.tar", extra=[entry("./0/layer.tar", layer({}))])
    refused(path, r"'0/layer\.tar' twice")


def test_a_layer_saved_as_a_link_to_an_identical_one_is_followed(tmp_path):
    """`docker save` links a layer to an identical one saved before: that is legitimate."""
    base = layer({"etc/passwd": PASSWD, "etc/group": GROUP})
    config = json.dumps(config_for([base, base])).encode()
    manifest = [{"Config": "config.json", "Layers": ["0/layer.tar", "1/layer.tar"]}]
    archive(tmp_path / "a.tar", members=[
        entry("config.json", config), entry("0/layer.tar", base),
        entry("1", kind=tarfile.DIRTYPE),
        entry("1/layer.tar", kind=tarfile.SYMTYPE, link="../0/layer.tar"),
        entry("manifest.json", json.dumps(manifest).encode())])
    assert inspect_tar(tmp_path / "a.tar").user.spec == "1000:1000"
    archive(tmp_path / "b.tar", members=[
        entry("config.json", config), entry("0/layer.tar", base),
        entry("1/layer.tar", kind=tarfile.SYMTYPE, link="../../etc/passwd"),
        entry("manifest.json", json.dumps(manifest).encode())])
    refused(tmp_path / "b.tar", r"a link leaving it: '1/layer\.tar'")


def test_an_entry_below_a_link_is_refused(tmp_path):
    path = archive(tmp_path / "a.tar", extra=[
        entry("x", kind=tarfile.SYMTYPE, link="0"), entry("x/layer.tar", layer({}))])
    refused(path, r"'x/layer\.tar' lies below the link 'x'")


@pytest.mark.parametrize(("manifest", "message"), [
    (b"this is not JSON", r"manifest\.json is not valid JSON"),
    (b"\xff\xfe{}", r"manifest\.json is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, r"manifest\.json is not valid JSON"),
    ({"Config": "config.json", "Layers": []}, r"manifest\.json is not a list of images"),
    ([], r"manifest\.json is not a list of images"),
    (["config.json"], r"manifest's image is a JSON str, an object with Config"),
    (["a", "b"], r"holds 2 images"),
    ([{"Layers": ["0/layer.tar"]}], r"has no Config"),
    ([{"Config": 5, "Layers": ["0/layer.tar"]}], r"has no Config"),
    ([{"Config": "config.json", "Layers": "0/layer.tar"}], r"Layers is not a list of paths"),
    ([{"Config": "config.json", "Layers": [5]}], r"Layers is not a list of paths"),
    ([{"Config": "config.json", "Layers": ["0/layer.tar"], "RepoTags": "x"}],
     r"RepoTags is not a list"),
    ([{"Config": "missing.json", "Layers": ["0/layer.tar"]}], r"config 'missing\.json' that is "
                                                             r"not a file"),
    ([{"Config": "manifest.json", "Layers": ["0/layer.tar"]}], r"config 'manifest\.json' that "
                                                               r"is not a file"),
    ([{"Config": "config.json", "Layers": ["9/layer.tar"]}], r"layer '9/layer\.tar' that is not"),
    ([{"Config": "config.json", "Layers": ["config.json"]}], r"the layer 'config\.json' is not "
                                                            r"a tar"),
])
def test_a_malformed_manifest_is_image_invalid_with_the_reason(tmp_path, manifest, message):
    refused(archive(tmp_path / "a.tar", manifest=manifest), message)


@pytest.mark.parametrize(("config", "message"), [
    (b"{not json", r"image config is not valid JSON"),
    (b"[1, 2]", r"image config is a JSON list, an object was expected"),
    ({"architecture": 5, "os": "linux"}, r"names no architecture"),
    ({"architecture": node_architecture(), "os": "linux", "config": "str"},
     r"`config` is not an object"),
    ({"architecture": node_architecture(), "config": {"User": 5, "Cmd": ["x"]}},
     r"User is not a string"),
    ({"architecture": node_architecture(), "config": {"User": "algo", "Cmd": "run"}},
     r"Cmd is not a list of strings"),
    ({"architecture": node_architecture(), "config": {"User": "algo", "Cmd": ["x"]},
      "rootfs": {"diff_ids": "sha256:0"}}, r"rootfs\.diff_ids is not a list"),
    ({"architecture": node_architecture(), "config": {"User": "algo", "Cmd": ["x"]}},
     r"has no rootfs\.diff_ids"),
    ({"architecture": node_architecture(), "config": {"User": "algo", "Cmd": ["x"]},
      "rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}, r"has the digest sha256:[0-9a-f]{64}, the "
                                                      r"config says sha256:0{64}"),
])
def test_a_malformed_config_is_image_invalid_with_the_reason(tmp_path, config, message):
    refused(archive(tmp_path / "a.tar", config=config), message)


# -- bounded memory and size -------------------------------------------------------------------


def test_a_huge_manifest_is_refused_by_its_size_before_it_is_read(tmp_path):
    huge = b"[" + b" " * (64 << 20) + b"]"
    refused(archive(tmp_path / "a.tar", manifest=huge),
            rf"manifest\.json is {len(huge)} bytes, more than the 1048576 allowed")
    # the same, gzipped: 64 MiB of JSON in a 65 KiB upload
    packed = tmp_path / "a.tar.gz"
    packed.write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    assert packed.stat().st_size < 1 << 20
    refused(packed, rf"manifest\.json is {len(huge)} bytes, more than the 1048576 allowed")


@pytest.mark.parametrize("name", ["repositories", "index.json"])
def test_other_json_members_are_bounded_too(tmp_path, name):
    huge = b"{" + b" " * (2 << 20) + b"}"
    refused(archive(tmp_path / "a.tar", extra=[entry(name, huge)]),
            rf"{name} is {len(huge)} bytes, more than the 1048576 allowed")


def test_a_huge_config_is_refused_by_its_size(tmp_path):
    config = config_for([layer({"etc/passwd": PASSWD})])
    config["pad"] = " " * (9 << 20)
    big = json.dumps(config).encode()
    refused(archive(tmp_path / "a.tar", config=big),
            rf"the config is {len(big)} bytes, more than the 8388608 allowed")


def test_a_huge_tar_header_is_refused_before_it_is_read(tmp_path):
    info, data = entry("pad", b"x")
    info.pax_headers = {"comment": "x" * (1 << 20)}
    refused(archive(tmp_path / "a.tar", extra=[(info, data)]), r"a tar header of \d+ bytes")


def test_too_many_entries_are_refused(tmp_path):
    extra = [entry(f"d{i}", kind=tarfile.DIRTYPE) for i in range(10_001)]
    refused(archive(tmp_path / "a.tar", extra=extra), r"more than 10000 entries")


@pytest.mark.parametrize("compress", ["gzip", "bzip2", "xz"])
def test_a_decompression_bomb_layer_is_stopped_at_the_limit(tmp_path, compress):
    bomb = layer({"etc/passwd": PASSWD, "etc/group": GROUP}, entry("zeros", bytes(64 << 20)))
    path = archive(tmp_path / "a.tar", layers=[bomb], compress=compress)
    assert path.stat().st_size < 1 << 20
    refused(path, r"the image's layers decompress to more than the 16 MiB allowed \(measured "
                  r"at least \d+ bytes", max_image_bytes=16 << 20)
    assert inspect_tar(path, max_image_bytes=65 << 20).user.spec == "1000:1000"


def test_a_bomb_split_over_concatenated_gzip_streams_is_counted_whole(tmp_path):
    bomb = layer({"etc/passwd": PASSWD, "etc/group": GROUP}, entry("zeros", bytes(32 << 20)))
    split = gzip.compress(bomb[:4096]) + gzip.compress(bomb[4096:])
    path = archive(tmp_path / "a.tar", layers=[bomb])
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != "0/layer.tar"]
    archive(path, members=[*kept, entry("0/layer.tar", split)])
    refused(path, r"decompress to more than the 16 MiB allowed", max_image_bytes=16 << 20)


def test_zstd_layers_are_refused_because_they_cannot_be_measured(tmp_path):
    path = archive(tmp_path / "a.tar")
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != "0/layer.tar"]
    archive(path, members=[*kept, entry("0/layer.tar", b"\x28\xb5\x2f\xfd" + bytes(100))])
    refused(path, r"zstd-compressed layers are not accepted")


# -- USER, by number ---------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "passwd", "group", "expected"), [
    ("algo", PASSWD, GROUP, "1000:1000"),
    ("1000:1000", b"", b"", "1000:1000"),
    ("algo:staff", PASSWD, GROUP, "1000:50"),
    ("1000", PASSWD, GROUP, "1000:1000"),
    ("00", PASSWD, GROUP, "uid 0"),
    ("+0", PASSWD, GROUP, "uid 0"),
    ("+0:1000", PASSWD, GROUP, "uid 0"),
    ("toor", PASSWD + b"toor:x:0:0::/root:/bin/sh\n", GROUP, "uid 0"),
    ("algo", b"algo:x:abc:1000::/:/bin/sh\n", GROUP, "uid 0"),  # runc reads junk as 0
    ("algo", b"algo:x:1000:0::/:/bin/sh\n", GROUP, "group id 0"),
    ("algo:root", PASSWD, GROUP, "group id 0"),
    ("algo:+00", PASSWD, GROUP, "group id 0"),
    ("4242", PASSWD, GROUP, "group id 0"),  # no passwd line: runc's default group is 0
    ("algo", PASSWD, GROUP + b"wheel:x:0:root,algo\n", "member of group 0"),
    ("ghost", PASSWD, GROUP, r"USER 'ghost' is not in its /etc/passwd"),
    ("algo:ghosts", PASSWD, GROUP, r"USER group 'ghosts' is not in its /etc/group"),
    ("-1:1000", PASSWD, GROUP, r"uid -1 is out of range"),
    ("99999999999:1", PASSWD, GROUP, r"uid 99999999999 is out of range"),
])
def test_user_is_resolved_to_numbers_and_root_refused(tmp_path, user, passwd, group, expected):
    path = archive(tmp_path / "a.tar", user=user,
                   layers=[layer({"etc/passwd": passwd, "etc/group": group})])
    if ":" in expected and expected[0].isdigit():
        assert inspect_tar(path).user.spec == expected
    else:
        refused(path, expected)


ROOT_ALGO = b"algo:x:0:0::/:/bin/sh\n"


@pytest.mark.parametrize(("upper", "expected"), [
    (layer({"etc/passwd": ROOT_ALGO}), "uid 0"),  # the last layer wins
    (layer({"./etc//passwd": ROOT_ALGO}), "uid 0"),  # however its path is spelled
    (layer({}, entry("etc/.wh.passwd")), r"'algo' is not in its /etc/passwd"),
    (layer({"etc/passwd": ROOT_ALGO}, entry("etc/.wh..wh..opq")), "uid 0"),
    (tar_bytes([entry("etc", kind=tarfile.SYMTYPE, link="elsewhere")]),
     r"/etc/passwd is not a regular file"),
    (layer({}, entry("etc/passwd", kind=tarfile.SYMTYPE, link="/shadow")),
     r"/etc/passwd is not a regular file"),
])
def test_account_files_follow_the_layers(tmp_path, upper, expected):
    lower = layer({"etc/passwd": PASSWD, "etc/group": GROUP})
    refused(archive(tmp_path / "a.tar", layers=[lower, upper]), expected)


def test_a_lower_root_entry_replaced_by_an_upper_layer_is_accepted(tmp_path):
    lower = layer({"etc/passwd": ROOT_ALGO, "etc/group": GROUP})
    upper = layer({"etc/passwd": PASSWD})
    assert inspect_tar(archive(tmp_path / "a.tar", layers=[lower, upper])).user.spec == \
        "1000:1000"


def test_resolution_matches_runc_for_supplementary_groups():
    user = resolve_user("algo", PASSWD.decode(), "wheel:x:0:algo\nvideo:x:44:algo\n")
    assert (user.uid, user.gid, user.supplementary) == (1000, 1000, (0, 44))
    explicit = resolve_user("algo:algo", PASSWD.decode(), "wheel:x:0:algo\nalgo:x:1000:\n")
    assert (explicit.uid, explicit.gid, explicit.supplementary) == (1000, 1000, ())


# -- VOLUMEs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("volume", ["/", "relative", "/input", "/output/x", "/proc/x", "/dev",
                                    "/input/../input"])
def test_volumes_the_sandbox_cannot_cover_are_refused_at_intake(tmp_path, volume):
    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    config = config_for(layers, Volumes={volume: {}})
    refused(archive(tmp_path / "a.tar", layers=layers, config=config), r"declares VOLUME")


# -- through the Docker Engine -----------------------------------------------------------------


def docker_build(tag: str, dockerfile: str) -> str:
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, "-"],
                   input=dockerfile, text=True, check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return tag


def image_id(client, reference: str) -> str | None:
    try:
        return client.api.inspect_image(reference)["Id"]
    except docker.errors.ImageNotFound:
        return None


def retag(tar_path: Path, out: Path, tags: list[str], target_hex: str) -> None:
    """Edit a real `docker save` tar: RepoTags, `repositories` and an OCI index naming `tags`."""
    with tarfile.open(tar_path) as source, tarfile.open(out, "w") as dest:
        for member in source:
            data = source.extractfile(member).read() if member.isreg() else None
            if member.name == "manifest.json":
                manifest = json.loads(data)
                manifest[0]["RepoTags"] = tags
                data = json.dumps(manifest).encode()
            if member.name == "repositories":
                continue
            if data is not None:
                member.size = len(data)
            dest.addfile(member, io.BytesIO(data) if data is not None else None)
        repositories = {}
        for tag in tags:
            repository, _, name = tag.rpartition(":")
            repositories.setdefault(repository, {})[name] = target_hex
        index = {"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": target_hex,
             "size": 1, "annotations": {"io.containerd.image.name": tag,
                                        "org.opencontainers.image.ref.name": tag}}
            for tag in tags]}
        for name, content in (("repositories", repositories), ("index.json", index)):
            raw = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            dest.addfile(info, io.BytesIO(raw))


@pytest.mark.docker
def test_an_archive_cannot_move_the_nodes_tags(docker_engine, runner, tmp_path):
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    token = uuid.uuid4().hex[:12]
    evaluator = f"organisers-test/evaluator:{token}"
    subprocess.run(["docker", "tag", "epreuve/base:3.11", evaluator], check=True)
    base_id, evaluator_id = image_id(client, "epreuve/base:3.11"), image_id(client, evaluator)
    attacker = docker_build(f"epreuve-attack/tags:{token}", (
        f"FROM epreuve/base:3.11\nLABEL attack={token}\nUSER 1000:1000\n"
        "CMD [\"python3\", \"-c\", \"print('attacker runs')\"]\n"))
    attacker_id = image_id(client, attacker)
    subprocess.run(["docker", "save", attacker, "-o", str(tmp_path / "saved.tar")], check=True)
    subprocess.run(["docker", "rmi", attacker], check=True, capture_output=True)
    retag(tmp_path / "saved.tar", tmp_path / "attack.tar", ["epreuve/base:3.11", evaluator],
          attacker_id.split(":")[1])
    try:
        pinned = pin_tar(tmp_path / "attack.tar", client, store=DirectoryStore(tmp_path / "store"))
        assert image_id(client, "epreuve/base:3.11") == base_id
        assert image_id(client, evaluator) == evaluator_id
        assert pinned.image_id == attacker_id
        assert client.api.inspect_image(attacker_id)["RepoTags"] == []
        result = runner.run(RunSpec(image=pinned.image_id, user=pinned.user,
                                    timeout_seconds=60))
        assert (result.status.value, result.image_id, result.user) == (
            "succeeded", attacker_id, "1000:1000")
        assert result.log_tail.strip() == "attacker runs"
    finally:
        if image_id(client, "epreuve/base:3.11") != base_id:  # never leave the node broken
            subprocess.run(["docker", "tag", base_id, "epreuve/base:3.11"], check=True)
        subprocess.run(["docker", "rmi", evaluator], capture_output=True)
        subprocess.run(["docker", "rmi", attacker_id], capture_output=True)


@pytest.mark.docker
def test_a_refused_archive_never_reaches_the_daemon(docker_engine, tmp_path):
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    bomb = layer({"etc/passwd": PASSWD, "etc/group": GROUP}, entry("zeros", bytes(32 << 20)))
    config = json.dumps(config_for([bomb], label=uuid.uuid4().hex)).encode()
    path = archive(tmp_path / "a.tar", layers=[bomb], config=config, compress="gzip")
    with pytest.raises(ImageInvalid, match="decompress to more than the 8 MiB allowed"):
        pin_tar(path, client, store=DirectoryStore(tmp_path / "store"), max_image_bytes=8 << 20,
                work_dir=tmp_path)
    assert image_id(client, "sha256:" + hashlib.sha256(config).hexdigest()) is None
    assert list(tmp_path.glob("epreuve-intake-*")) == []  # our copy is gone too


@pytest.mark.docker
def test_a_volume_is_a_small_tmpfs_not_the_daemons_disk(docker_engine, runner, tmp_path):
    token = uuid.uuid4().hex[:12]
    tag = docker_build(f"epreuve-attack/volume:{token}", (
        "FROM epreuve/base:3.11\nVOLUME /data /scratch/\nUSER 1000:1000\n"
        "CMD [\"sh\", \"-c\", \"grep -E ' /(data|scratch) ' /proc/mounts | cut -d' ' -f1-3; "
        "head -c 33554432 /dev/zero 2>/dev/null > /data/fill || echo refused past the quota; "
        "wc -c < /data/fill\"]\n"))
    try:
        result = runner.run(RunSpec(image=tag, tmp_size_bytes=8 << 20, timeout_seconds=60))
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True)
    assert result.reason is None, result.message
    lines = [line for line in result.log_tail.splitlines() if line]
    assert sorted(lines[:2]) == ["tmpfs /data tmpfs", "tmpfs /scratch tmpfs"]
    assert lines[2:] == ["refused past the quota", str(8 << 20)]  # exactly the tmpfs


@pytest.mark.docker
def test_a_volume_over_the_sandbox_mounts_is_refused_by_the_runner(docker_engine, runner):
    tag = docker_build(f"epreuve-attack/volume-input:{uuid.uuid4().hex[:12]}",
                       "FROM epreuve/base:3.11\nVOLUME /input/x\nUSER 1000:1000\nCMD [\"true\"]\n")
    try:
        result = runner.run(RunSpec(image=tag, timeout_seconds=60))
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True)
    assert result.reason is FailureReason.IMAGE_INVALID
    assert "VOLUME '/input/x' is not allowed" in result.message


@pytest.mark.docker
@pytest.mark.parametrize(("user", "passwd_line", "expected"), [
    ("toor", "toor:x:0:0::/:/bin/sh", "65534:65534"),
    ("00", None, "65534:65534"),
    ("algo", "algo:x:1000:0::/:/bin/sh", "1000:65534"),
    ("algo", "algo:x:1000:1000::/:/bin/sh", "1000:1000"),
])
def test_the_runner_runs_resolved_numbers(docker_engine, runner, user, passwd_line, expected):
    token = uuid.uuid4().hex[:12]
    add = f"RUN echo '{passwd_line}' >> /etc/passwd\n" if passwd_line else ""
    tag = docker_build(f"epreuve-attack/user:{token}", (
        f"FROM epreuve/base:3.11\n{add}USER {user}\n"
        "CMD [\"sh\", \"-c\", \"echo $(id -u):$(id -g):$(id -G)\"]\n"))
    try:
        result = runner.run(RunSpec(image=tag, timeout_seconds=60))
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True)
    assert result.reason is None, result.message
    uid, gid = expected.split(":")
    assert (result.user, result.log_tail.strip()) == (expected, f"{uid}:{gid}:{gid}")


@pytest.mark.docker
def test_a_tag_moved_onto_the_loaded_image_is_put_back(docker_engine):
    """The second line of defence, should a load ever tag: the tag goes back, intake refuses."""
    from engine.images import _check_tags_unmoved

    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    token = uuid.uuid4().hex[:12]
    victim = docker_build(f"organisers-test/victim:{token}",
                          f"FROM epreuve/base:3.11\nLABEL which=victim-{token}\n")
    loaded = docker_build(f"epreuve-attack/loaded:{token}",
                          f"FROM epreuve/base:3.11\nLABEL which=loaded-{token}\n")
    victim_id, loaded_id = image_id(client, victim), image_id(client, loaded)
    before = {victim: victim_id, f"organisers-test/new:{token}": None}
    try:
        client.api.tag(loaded_id, "organisers-test/victim", token, force=True)
        client.api.tag(loaded_id, "organisers-test/new", token)
        with pytest.raises(ImageInvalid, match=r"moved the node's tags \['organisers-test/victim"):
            _check_tags_unmoved(client, before, loaded_id)
        assert image_id(client, victim) == victim_id
        assert image_id(client, f"organisers-test/new:{token}") is None
    finally:
        for tag in (victim, loaded, f"organisers-test/new:{token}"):
            subprocess.run(["docker", "rmi", tag], capture_output=True)
        subprocess.run(["docker", "rmi", victim_id], capture_output=True)
