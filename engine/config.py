"""Settings, from the environment. The embedded default needs nothing installed:
SQLite in the data directory and the local Docker Engine.

    EPREUVE_DATA_DIR       where the database, submissions' outputs and runs live
                           (default ~/.local/share/epreuve)
    EPREUVE_DATABASE_URL   a SQLAlchemy URL (default sqlite:///<data dir>/epreuve.db);
                           postgresql+psycopg://... for many nodes
    EPREUVE_STATE_DIR      runner state: output areas, verification cache
                           (default <data dir>/state)
    EPREUVE_RUNNER         the runner backend (default docker: the local Docker Engine)
    EPREUVE_STORE_DIR      the content-addressed store of image tars (default <data dir>/store)
    EPREUVE_DATASETS_DIR   where the server looks for sealed datasets named by a challenge
                           sent over the API (default <data dir>/datasets)
    DOCKER_HOST            the Docker Engine (default unix:///var/run/docker.sock)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    state_dir: Path
    runner: str = "docker"  # the backend make_runner() builds
    store_dir_override: Path | None = None
    datasets_dir_override: Path | None = None

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def store_dir(self) -> Path:
        return self.store_dir_override or self.data_dir / "store"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def datasets_dir(self) -> Path:
        """A challenge sent over the API may only name sealed datasets under this folder."""
        return self.datasets_dir_override or self.data_dir / "datasets"


def load_settings() -> Settings:
    data_dir = Path(os.environ.get("EPREUVE_DATA_DIR")
                    or Path.home() / ".local" / "share" / "epreuve").expanduser()
    database_url = os.environ.get("EPREUVE_DATABASE_URL") or f"sqlite:///{data_dir / 'epreuve.db'}"
    state_dir = Path(os.environ.get("EPREUVE_STATE_DIR") or data_dir / "state")
    return Settings(data_dir=data_dir, database_url=database_url, state_dir=state_dir,
                    runner=os.environ.get("EPREUVE_RUNNER") or "docker",
                    store_dir_override=Path(os.environ["EPREUVE_STORE_DIR"])
                    if os.environ.get("EPREUVE_STORE_DIR") else None,
                    datasets_dir_override=Path(os.environ["EPREUVE_DATASETS_DIR"])
                    if os.environ.get("EPREUVE_DATASETS_DIR") else None)
