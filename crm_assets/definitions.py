"""The Dagster definitions: the asset graph generated from the dataflow document."""

from __future__ import annotations

import dagster as dg

from crm_assets.defs.flows import build_flow_assets
from crm_assets.engine.document import read_document
from crm_assets.settings import Settings


def build_definitions(settings: Settings) -> dg.Definitions:
    """Everything Dagster loads, for one configuration."""
    document = read_document(settings.spec_path)
    return dg.Definitions(assets=build_flow_assets(document, settings.data_dir))


defs = build_definitions(Settings.from_env())
