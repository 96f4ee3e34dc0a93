"""A real uvicorn process serving tests/uploads_app.py on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine.config import Settings
from tests.conftest import REPO

STARTUP_SECONDS = 60  # how long to wait for a server to answer before failing the test


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class UploadServer:
    def __init__(self, settings: Settings, tokens: dict[str, list], log: Path, **env: str):
        self.settings = settings
        self.tokens = tokens
        self.log = log
        self.env = env
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UploadServer:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "EPREUVE_DATA_DIR":
               str(self.settings.data_dir), "EPREUVE_DATABASE_URL": self.settings.database_url,
               "EPREUVE_TEST_TOKENS": json.dumps(self.tokens), **self.env}
        env.pop("EPREUVE_STORE_DIR", None)
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "tests.uploads_app:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not answer: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, as a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_kib(self) -> int:
        """The server's resident memory now (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0
