"""Configuration from the environment, one place for every name and its demo default.

Plain Python (no Dagster) so the CLI, the embedded services and the engine share it.
Each connector declares its own settings (``crm_assets/<crm>/connector.py``);
the Dagster resources read the same names through ``EnvVar``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from crm_assets.connectors import CONNECTORS
from crm_assets.engine.link_copies import copies_folder
from crm_assets.engine.storage import Storage

#: The sync's own settings with their defaults (listed in the README).
SYNC_DEFAULTS: dict[str, str] = {
    "CRM_SYNC_DATA_DIR": ".crm_sync",
    "CRM_SYNC_DATA_URL": "",  # empty: CRM_SYNC_DATA_DIR; s3://bucket/prefix: on S3
    "CRM_SYNC_STATE_URL": "",  # empty: SQLite file in CRM_SYNC_DATA_DIR
    "CRM_SYNC_SPEC": "",  # empty: the packaged document; else documents or folders, comma-separated
    "CRM_SYNC_SKIP_UNSUPPORTED": "",  # set: flows no connector provides are skipped, not errors
}

#: Every configuration variable with its demo default: the connectors' and the sync's.
DEFAULTS: dict[str, str] = {
    **{s.name: s.default for c in CONNECTORS for s in c.settings},
    **SYNC_DEFAULTS,
}

#: The names that hold secrets: never logged, never shown.
SECRET_NAMES = tuple(s.name for c in CONNECTORS for s in c.settings if s.secret)


def env(name: str) -> str:
    """The value of a configuration variable, or its demo default."""
    return os.environ.get(name) or DEFAULTS[name]


def sensor_interval() -> int:
    """Seconds between sensor ticks (``CRM_SYNC_SENSOR_INTERVAL``, default 5): an edit waits
    half of it on average before its run is queued. Dagster's sensor daemon ticks at most
    every 5 s, so a smaller value changes nothing (measured: benchmarks/RESULTS.md)."""
    return int(os.environ.get("CRM_SYNC_SENSOR_INTERVAL") or 5)


def packaged_spec_path() -> Path:
    """The project's own dataflow document, with the property tables filled in."""
    return Path(str(resources.files("crm_assets") / "specs" / "customcrm-crmoffice.rst"))


def spec_paths(value: str) -> tuple[Path, ...]:
    """The documents and folders ``CRM_SYNC_SPEC`` names (comma-separated), else the
    packaged document."""
    return tuple(Path(p.strip()) for p in value.split(",") if p.strip()) or (packaged_spec_path(),)


@dataclass(frozen=True)
class Settings:
    """The sync's own settings at one moment (each CRM's are its connector's).

    Snapshots, plans and reports go to ``data_url`` (``CRM_SYNC_DATA_URL``) when set,
    else to the local ``data_dir``; the default state database stays local in
    ``data_dir`` whatever ``data_url`` says, as SQLite on S3 would not be a database.
    """

    data_dir: Path
    state_url: str
    spec_paths: tuple[Path, ...]
    skip_unsupported: bool = False
    data_url: str = ""

    def data(self) -> Storage:
        """The data folder."""
        return Storage.at(self.data_url or self.data_dir)

    @property
    def link_copies(self) -> Storage:
        """Where the state's link copies are kept: in the data folder, local or on S3."""
        return copies_folder(self.data())

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(env("CRM_SYNC_DATA_DIR")).resolve()
        return cls(
            data_dir=data_dir,
            data_url=env("CRM_SYNC_DATA_URL"),
            state_url=env("CRM_SYNC_STATE_URL") or f"sqlite:///{data_dir / 'state.db'}",
            spec_paths=spec_paths(env("CRM_SYNC_SPEC")),
            skip_unsupported=env("CRM_SYNC_SKIP_UNSUPPORTED").lower() in ("1", "true", "yes"),
        )
