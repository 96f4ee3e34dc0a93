"""Try everything a container must not be able to do to its host or its sandbox."""

import ctypes
import ctypes.util
import os
import subprocess

from report import attempt, write


def write_file(path):
    def action():
        with open(path, "w") as handle:
            handle.write("x")
    return action


libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_syscall():
    os.makedirs("/tmp/mnt", exist_ok=True)
    if libc.mount(b"none", b"/tmp/mnt", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")


with open("/output/mine.txt", "w") as handle:
    handle.write("mine")
suid = subprocess.run(["/usr/local/bin/suid-python", "-c", "import os; print(os.geteuid())"],
                      capture_output=True, text=True)
mount_cmd = subprocess.run(["mount", "-t", "tmpfs", "none", "/tmp/mnt"], capture_output=True,
                           text=True)
write("privileges.json", {
    "uid": os.getuid(),
    "write_input": attempt(write_file("/input/planted.txt")),
    "write_root": attempt(write_file("/planted.txt")),
    "write_usr": attempt(write_file("/usr/planted.txt")),
    "write_etc_passwd": attempt(write_file("/etc/passwd")),
    "mount_syscall": attempt(mount_syscall),
    "mount_command_rc": mount_cmd.returncode,
    "chown_to_root": attempt(lambda: os.chown("/output/mine.txt", 0, 0)),
    "setuid_root": attempt(lambda: os.setuid(0)),
    "suid_binary_euid": suid.stdout.strip() or suid.stderr.strip(),
    "docker_socket": os.path.exists("/var/run/docker.sock"),
    "mknod": attempt(lambda: os.mknod("/tmp/dev", 0o600 | 0o020000, os.makedev(1, 3))),
})
