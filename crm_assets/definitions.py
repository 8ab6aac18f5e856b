"""The Dagster definitions: the asset graph generated from the dataflow document."""

from __future__ import annotations

import os

import dagster as dg

from crm_assets.defs.flows import build_flow_assets
from crm_assets.defs.resources import build_resources
from crm_assets.defs.snapshots import build_snapshot_assets
from crm_assets.engine.document import read_document
from crm_assets.settings import DEFAULTS, Settings


def build_definitions(settings: Settings) -> dg.Definitions:
    """Everything Dagster loads, for one configuration."""
    # EnvVar needs the variables set: unset ones take their documented demo default
    for name, default in DEFAULTS.items():
        if default:
            os.environ.setdefault(name, default)
    document = read_document(settings.spec_path)
    return dg.Definitions(
        assets=[
            *build_snapshot_assets(document),
            *build_flow_assets(document, settings.data_dir),
        ],
        resources=build_resources(settings.data_dir),
    )


defs = build_definitions(Settings.from_env())
