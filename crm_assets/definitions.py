"""The Dagster definitions: the asset graph generated from the dataflow document."""

from __future__ import annotations

import os

import dagster as dg

from crm_assets.defs.automation import build_automation
from crm_assets.defs.flows import build_flow_assets
from crm_assets.defs.quality import (
    QA_REPORT_KEY,
    build_qa_report_asset,
    build_verified_asset,
    circuit_breaker_check,
)
from crm_assets.defs.resources import build_resources
from crm_assets.defs.snapshots import build_snapshot_assets
from crm_assets.defs.sync_assets import build_sync_assets
from crm_assets.engine.document import read_document
from crm_assets.settings import DEFAULTS, Settings
from crm_assets.sync import flow_mappings


def build_definitions(settings: Settings) -> dg.Definitions:
    """Everything Dagster loads, for one configuration."""
    # EnvVar needs the variables set: unset ones take their documented demo default
    for name, default in DEFAULTS.items():
        if default:
            os.environ.setdefault(name, default)
    document = read_document(settings.spec_path)
    mappings = flow_mappings(document)
    by_name = {m.name: m for m in mappings}
    sync_assets = [
        asset
        for m in mappings
        for asset in (
            *build_sync_assets(m, [by_name[r] for r in m.references]),
            build_verified_asset(m),
        )
    ]
    jobs = [
        dg.define_asset_job(
            f"sync_{m.name}",
            # the QA report too, so that a sensor-started run leaves it current
            selection=dg.AssetSelection.groups(m.name)
            | dg.AssetSelection.assets(m.a.asset_path, m.b.asset_path, QA_REPORT_KEY),
            description=f"Snapshot both sides and sync '{m.title}'.",
        )
        for m in mappings
    ]
    jobs.append(
        dg.define_asset_job(
            "sync_all", selection=dg.AssetSelection.all(), description="Every flow."
        )
    )
    sensors, schedules = build_automation(mappings, {j.name: j for j in jobs})
    return dg.Definitions(
        sensors=sensors,
        schedules=schedules,
        assets=[
            *build_snapshot_assets(document),
            *build_flow_assets(document, settings.data_dir),
            *sync_assets,
            build_qa_report_asset(document, mappings),
        ],
        asset_checks=[circuit_breaker_check(m) for m in mappings],
        jobs=jobs,
        resources=build_resources(settings.data_dir, settings.state_url),
        # one process per run: a sync is a short chain of steps, and a subprocess per
        # step would cost more than the steps themselves (edit-to-visible latency)
        executor=dg.in_process_executor,
    )


defs = build_definitions(Settings.from_env())
