"""Variants of the hostile-participant attacks on the sandbox runner: real images, real runs.

- what a container writes to its logs is shown, never replayed: control and escape
  sequences (a terminal's screen, title, cursor) and invalid UTF-8 reach organisers and
  participants as visible text, never as bytes their terminal would obey;
- an image's HEALTHCHECK never runs inside the sandbox: only the engine's command runs;
- an image's LABELs can never name another run to the reaper.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest

from runners.base import FailureReason, RunSpec
from runners.docker import LABEL_RUN, DockerRunner, owner_token
from runners.logs import LogTail

pytestmark = pytest.mark.docker


def image_from(base: str, tag: str, *lines: str) -> str:
    """A test image: `base` plus the given Dockerfile lines, built offline."""
    dockerfile = "\n".join([f"FROM {base}", *lines]) + "\n"
    subprocess.run(["docker", "build", "--network", "none", "-q", "-t", tag, "-"],
                   input=dockerfile, text=True, check=True, capture_output=True)
    return tag


def python(code: str) -> tuple[str, ...]:
    return ("python3", "-c", code)


# -- logs -----------------------------------------------------------------------------------


HOSTILE_LOG = (b"clear\x1b[2J title\x1b]0;pwned\x07 nul\x00 c1\xc2\x9b31m bidi\xe2\x80\xae"
               b" bad\xff\xfe crlf\r\n tab\tend\n")
SHOWN_LOG = ("clear\\x1b[2J title\\x1b]0;pwned\\x07 nul\\x00 c1\\x9b31m bidi\\u202e"
             " bad\ufffd\ufffd crlf\n tab\tend\n")


def test_log_escape_sequences_and_invalid_utf8_are_shown_never_replayed(runner, adversarial):
    code = f"import sys; sys.stdout.buffer.write({HOSTILE_LOG!r})"
    result = runner.run(RunSpec(image=adversarial["probe"], command=python(code),
                                timeout_seconds=60))
    assert result.succeeded, result.message
    assert result.log_tail == SHOWN_LOG


def test_a_log_cut_at_the_cap_is_still_clean():
    tail = LogTail(cap_bytes=8)
    tail.feed(b"\x1b[2J" * 4 + b"\xc3\xa9")  # the cap cuts an escape sequence
    assert tail.text() == "2J\\x1b[2J\u00e9"


# -- what runs in the sandbox --------------------------------------------------------------


def test_an_image_healthcheck_never_runs_in_the_sandbox(runner, adversarial, tmp_path):
    image = image_from(adversarial["probe"], "epreuve-test/attack1-healthcheck:latest",
                       'HEALTHCHECK --interval=10ms --start-period=1ms '
                       'CMD ["python3", "-c", "open(\'/output/healthcheck-ran\', \'w\')"]')
    code = ("import os, time\n"
            "for _ in range(40):\n"
            "    if os.path.exists('/output/healthcheck-ran'): break\n"
            "    time.sleep(0.05)\n"
            "print('healthcheck ran' if os.path.exists('/output/healthcheck-ran') "
            "else 'only our command ran')\n")
    result = runner.run(RunSpec(image=image, command=python(code), timeout_seconds=60,
                                output_dir=tmp_path / "out"))
    assert result.succeeded, result.message
    assert result.log_tail == "only our command ran\n"
    assert not (tmp_path / "out" / "healthcheck-ran").exists()


# -- labels ---------------------------------------------------------------------------------


def test_an_image_label_cannot_name_another_run_to_the_reaper(adversarial, tmp_path,
                                                               monkeypatch):
    victim_run = f"epreuve-{uuid.uuid4().hex[:12]}"
    image = image_from(adversarial["probe"], "epreuve-test/attack1-run-label:latest",
                       f"LABEL {LABEL_RUN}={victim_run} org.epreuve.managed=true")
    runner = DockerRunner(state_dir=tmp_path / "runs", reap_orphans=False)
    victim = runner.state_dir / victim_run  # another worker's run, in progress
    (victim / "output").mkdir(parents=True)
    (victim / "owner").write_text(owner_token(os.getppid()))  # a live process: not ours
    (victim / "output" / "mask.nii.gz").write_bytes(b"half written")

    # This process dies between creating the container that reads a user's account files
    # and removing it: the container stays, labelled by the image.
    monkeypatch.setattr(runner, "_remove_container", lambda cid: False)
    runner.account_files(runner.api.inspect_image(image))  # as on the node, even if refused
    monkeypatch.undo()
    left = runner.api.containers(all=True, filters={"label": f"org.epreuve.owner={runner.owner}"})
    assert len(left) == 1

    assert runner.reap_orphans() == [left[0]["Id"]]
    assert (victim / "output" / "mask.nii.gz").read_bytes() == b"half written"


def test_an_image_claiming_the_reapers_labels_is_refused(runner, adversarial):
    """Docker copies an image's labels onto any container made from it (an operator's
    `docker run` too): a dead owner and a run name would send the reaper after them."""
    image = image_from(adversarial["probe"], "epreuve-test/attack1-reaper-labels:latest",
                       "LABEL org.epreuve.managed=true org.epreuve.owner=gone:4194305:1 "
                       "org.epreuve.run=epreuve-000000000000")
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert ("the image sets the labels ['org.epreuve.managed', 'org.epreuve.owner', "
            "'org.epreuve.run'], which are the platform's own") in result.message


# -- an image cannot pass its own failure to start for the platform's -----------------------

UNSTARTABLE = {
    "relative WorkingDir": ({"WorkingDir": "relative/dir"}, "not an absolute path"),
    "WorkingDir in /input": ({"WorkingDir": "/input/sub"}, "lies inside /input"),
    "WorkingDir into /input by ..": ({"WorkingDir": "/tmp/../input/x"}, "lies inside /input"),
    "WorkingDir in /sys": ({"WorkingDir": "/sys/made-up"}, "lies inside /sys"),
    "Env with NUL": ({"Env": ["A=b\u0000c"]}, "NUL character"),
    "Env with an empty name": ({"Env": ["=x"]}, "empty name"),
    "the reaper's labels": ({"Labels": {"org.epreuve.owner": "gone:4194305:1"}},
                            "platform's own"),
}


def loaded_directly(tmp_path, settings: dict) -> str:
    """A crafted image put on the node without intake (an organiser's, or one pinned before
    a check existed): the runner must refuse it on its own."""
    from tests.test_image_intake_attacks import GROUP, PASSWD, archive, config_for, layer

    layers = [layer({"etc/passwd": PASSWD, "etc/group": GROUP})]
    config = config_for(layers, "1000:1000", **settings)
    path = archive(tmp_path / "image.tar", layers=layers, config=config,
                   manifest=[{"Config": "config.json", "RepoTags": None,
                              "Layers": ["0/layer.tar"]}])
    out = subprocess.run(["docker", "load", "-q", "-i", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().rpartition(" ")[2]  # "Loaded image ID: sha256:..."


@pytest.mark.parametrize("settings,message", UNSTARTABLE.values(), ids=UNSTARTABLE.keys())
def test_an_unstartable_config_is_the_images_fault_not_the_platforms(runner, tmp_path,
                                                                     settings, message):
    image_id = loaded_directly(tmp_path, settings)
    try:
        result = runner.run(RunSpec(image=image_id, timeout_seconds=60))
    finally:
        subprocess.run(["docker", "rmi", image_id], capture_output=True)
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert message in result.message


def test_a_working_dir_reaching_input_through_a_link_is_the_images_fault(runner, adversarial):
    image = image_from(adversarial["probe"], "epreuve-test/attack1-workdir-link:latest",
                       "USER root", "RUN ln -s /input/sub /opt/work", "USER 10001",
                       "WORKDIR /opt/work")
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert "mkdir /opt/work: file exists" in result.message


def test_the_daemons_words_about_an_image_are_shown_never_replayed(runner, adversarial):
    """runc's refusal echoes the image's WorkingDir: its escape sequence must not reach a
    terminal (or a database, for a NUL) as it is."""
    image = image_from(adversarial["probe"], "epreuve-test/attack1-workdir-escape:latest",
                       "USER root", 'RUN ln -s /input/sub "/opt/w$(printf "\\033")[2J"',
                       "USER 10001", 'WORKDIR "/opt/w\x1b[2J"')
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert "mkdir /opt/w\\x1b[2J: file exists" in result.message
    assert "\x1b" not in result.message


# -- VOLUMEs: a path Docker cleans otherwise than we do --------------------------------------


def test_a_volume_with_a_leading_double_slash_is_only_a_tmpfs(runner, adversarial):
    """Docker cleans `//data` to `/data` (Go), POSIX's normpath keeps it: a tmpfs keyed on
    `//data` would leave Docker's anonymous volume, a directory on its own disk, mounted."""
    image = image_from(adversarial["probe"], "epreuve-test/attack1-volume-slashes:latest",
                       'VOLUME ["//data", "/tmp//x", "/opt/./v/"]')
    code = ("for line in open('/proc/mounts'):\n"
            "    device, target, kind = line.split()[:3]\n"
            "    if target in ('/data', '/tmp/x', '/opt/v'): print(device, target, kind)\n")
    result = runner.run(RunSpec(image=image, command=python(code), timeout_seconds=60))
    assert result.succeeded, result.message
    assert sorted(result.log_tail.splitlines()) == [
        "tmpfs /data tmpfs", "tmpfs /opt/v tmpfs", "tmpfs /tmp/x tmpfs"]


@pytest.mark.parametrize("volume", ["//input", "//input/x", "//output/x", "//proc/x", "//dev"])
def test_a_volume_reaching_a_sandbox_mount_by_double_slash_is_refused(runner, adversarial,
                                                                      volume):
    tag = f"epreuve-test/attack1-volume-{volume.strip('/').replace('/', '-')}:latest"
    image = image_from(adversarial["probe"], tag, f'VOLUME ["{volume}"]')
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert f"VOLUME {volume!r} is not allowed" in result.message


LINKED_VOLUMES = {  # link made in the image, VOLUME declared, where the mount would land
    "to /proc/self/fd": ("/proc/self/fd", "/vol", "/vol", "/proc/self/fd"),
    "to /output": ("/output", "/vol", "/vol", "/output"),
    "to /input": ("/input", "/vol", "/vol", "/input"),
    "through a linked parent": ("/proc/self", "/vol", "/vol/fd", "/proc/self/fd"),
    "to the root": ("/", "/vol", "/vol", "/"),
}


@pytest.mark.parametrize("target,link,volume,landing", LINKED_VOLUMES.values(),
                         ids=LINKED_VOLUMES.keys())
def test_a_volume_reached_through_a_link_of_the_image_is_refused(runner, adversarial, target,
                                                                 link, volume, landing):
    """Docker mounts a VOLUME's tmpfs where the image's link points: over /output, /input,
    or into /proc, where runc then fails to start (which would pass for the platform's
    fault). The path we checked is not the one mounted: refused."""
    tag = f"epreuve-test/attack1-linked-volume-{target.strip('/').replace('/', '-')}x:latest"
    image = image_from(adversarial["probe"], tag, "USER root", f"RUN ln -s {target} {link}",
                       "USER 10001", f"VOLUME {volume}")
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert (f"the image's symbolic links lead {volume}, which the sandbox mounts, to {landing}"
            in result.message)


SANDBOX_LINKS = {  # a path the sandbox mounts, made a link in the image: where it lands
    "/tmp into /proc": ("rm -rf /tmp && ln -s /proc/self/fd /tmp", "/tmp", "/proc/self/fd"),
    "/tmp onto /output": ("rm -rf /tmp && ln -s /output /tmp", "/tmp", "/output"),
    "/output into /proc": ("ln -s /proc/self/fd /output", "/output", "/proc/self/fd"),
    "/input into /proc": ("ln -s /proc/self/fd /input", "/input", "/proc/self/fd"),
    "/input onto /output": ("ln -s /output /input", "/input", "/output"),
    "/input by a chain": ("ln -s /opt/hop /input && ln -s /sys/kernel /opt/hop", "/input",
                          "/sys/kernel"),
    "/input by a relative link": ("ln -s ../../proc/self /input", "/input", "/proc/self"),
}


@pytest.mark.parametrize("name", SANDBOX_LINKS)
def test_a_sandbox_mount_reached_through_a_link_of_the_image_is_refused(runner, adversarial,
                                                                        name):
    command, path, landing = SANDBOX_LINKS[name]
    tag = f"epreuve-test/attack1-linked-{'-'.join(re.findall('[a-z]+', name))}:latest"
    image = image_from(adversarial["probe"], tag, "USER root", f"RUN {command}", "USER 10001")
    result = runner.run(RunSpec(image=image, timeout_seconds=60))
    assert result.reason is FailureReason.IMAGE_INVALID, result.detail
    assert (f"the image's symbolic links lead {path}, which the sandbox mounts, to {landing}"
            in result.message)


def test_a_link_to_an_ordinary_place_is_left_alone(runner, adversarial):
    """systemd images link /etc/resolv.conf into /run: Docker mounts there, harmlessly."""
    image = image_from(adversarial["probe"], "epreuve-test/attack1-ordinary-links:latest",
                       "USER root", "RUN mkdir -p /srv/data /run/x && ln -s /srv/data /vol "
                       "&& rm -rf /tmp && ln -s /var/tmp /tmp", "USER 10001", "VOLUME /vol")
    result = runner.run(RunSpec(image=image, command=python("print('ran')"),
                                timeout_seconds=60))
    assert result.succeeded, result.message
    assert result.log_tail == "ran\n"


# -- limits that would round to "no limit" -------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("cpus", 1e-10, "at least 0.01"),  # NanoCpus 0: Docker's "no CPU limit"
    ("cpus", 0.001, "at least 0.01"),
    ("pids_limit", 0.5, "whole number"),
    ("memory_bytes", 2.5e9, "whole number"),
    ("output_quota_bytes", 1e3, "whole number"),
])
def test_a_limit_that_would_round_to_no_limit_is_refused(field, value, message):
    from runners.base import InvalidRunSpec

    with pytest.raises(InvalidRunSpec, match=f"RunSpec.{field} must be .*{message}"):
        RunSpec(image="any", **{field: value})


# -- a run changed from outside the engine -------------------------------------------------


@pytest.mark.parametrize("how,action", [("update", "update"), ("exec", "exec_create"),
                                        ("copy", "extract-to-dir")])
def test_a_run_changed_from_outside_is_the_platforms_fault(runner, adversarial, tmp_path, how,
                                                           action):
    """Limits lowered, a process started or a file put into /output by someone else while it
    ran: what the run measured is not the team's alone."""
    import io
    import tarfile

    import docker

    from tests.test_runner_faults import (
        gated_spec,
        release,
        run_in_background,
        running_container,
    )

    spec = gated_spec(adversarial["probe"], tmp_path, "exit 0", timeout_seconds=120)
    thread, box = run_in_background(runner, spec)
    cid = running_container(runner, spec)["Id"]
    operator = docker.APIClient(base_url=runner.base_url)
    if how == "update":
        operator.update_container(cid, cpu_shares=512)
    elif how == "exec":
        operator.exec_start(operator.exec_create(cid, ["true"])["Id"])
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("mask.nii.gz")
            tar.addfile(info, io.BytesIO(b""))
        operator.put_archive(cid, "/output", buffer.getvalue())
    release(spec)
    thread.join(120)
    result = box["result"]
    assert result.reason is FailureReason.INFRASTRUCTURE, result.message
    assert f"the daemon reported `{action}" in result.detail


# -- a pinned image missing from the node ---------------------------------------------------


def test_a_pinned_image_absent_from_the_node_is_the_platforms_fault(runner):
    """Intake pinned the id, so the platform promised it: a node without it (pruned, or one
    that never had it) is never the team's failure."""
    result = runner.run(RunSpec(image="sha256:" + "0" * 64, timeout_seconds=60))
    assert result.reason is FailureReason.INFRASTRUCTURE
    assert "not caused by your submission" in result.message
    assert f"the pinned image sha256:{'0' * 64} is not on this node" in result.detail


def test_a_name_absent_from_the_node_stays_the_images_problem(runner):
    result = runner.run(RunSpec(image="epreuve-test/attack1-never-built:latest"))
    assert result.reason is FailureReason.IMAGE_INVALID
    assert "never pulls" in result.message
