"""Configuration from the environment, one place for every name and its demo default.

Plain Python (no Dagster) so the CLI, the embedded services and the engine share it.
The Dagster resources read the same names through ``EnvVar``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: Every configuration variable with its demo default (listed in the README).
DEFAULTS: dict[str, str] = {
    "CUSTOM_CRM_BASE_URL": "http://127.0.0.1:8101",
    "CUSTOM_CRM_API_KEY": "demo-custom-crm-key",
    "CRM_OFFICE_BASE_URL": "http://127.0.0.1:8102",
    "CRM_OFFICE_CLIENT_ID": "demo-client",
    "CRM_OFFICE_CLIENT_SECRET": "demo-client-secret",
    "CRM_SYNC_DATA_DIR": ".crm_sync",
    "CRM_SYNC_STATE_URL": "",  # empty: SQLite file in CRM_SYNC_DATA_DIR
    "CRM_SYNC_SPEC": "",  # empty: the packaged document
}

#: The names that hold secrets: never logged, never shown.
SECRET_NAMES = ("CUSTOM_CRM_API_KEY", "CRM_OFFICE_CLIENT_SECRET")


def env(name: str) -> str:
    """The value of a configuration variable, or its demo default."""
    return os.environ.get(name) or DEFAULTS[name]


def packaged_spec_path() -> Path:
    """The project's own dataflow document, with the property tables filled in."""
    return Path(str(resources.files("crm_assets") / "specs" / "customcrm-crmoffice.rst"))


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration at one moment."""

    custom_crm_base_url: str
    custom_crm_api_key: str
    crm_office_base_url: str
    crm_office_client_id: str
    crm_office_client_secret: str
    data_dir: Path
    state_url: str
    spec_path: Path

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(env("CRM_SYNC_DATA_DIR")).resolve()
        return cls(
            custom_crm_base_url=env("CUSTOM_CRM_BASE_URL"),
            custom_crm_api_key=env("CUSTOM_CRM_API_KEY"),
            crm_office_base_url=env("CRM_OFFICE_BASE_URL"),
            crm_office_client_id=env("CRM_OFFICE_CLIENT_ID"),
            crm_office_client_secret=env("CRM_OFFICE_CLIENT_SECRET"),
            data_dir=data_dir,
            state_url=env("CRM_SYNC_STATE_URL") or f"sqlite:///{data_dir / 'state.db'}",
            spec_path=Path(env("CRM_SYNC_SPEC")) if env("CRM_SYNC_SPEC") else packaged_spec_path(),
        )
