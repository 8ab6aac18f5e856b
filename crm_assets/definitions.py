"""The Dagster definitions: the asset graph generated from the dataflow documents."""

from __future__ import annotations

import os

import dagster as dg

from crm_assets.connectors import connector_by_key
from crm_assets.defs.automation import build_automation
from crm_assets.defs.flows import build_flow_assets
from crm_assets.defs.quality import (
    QA_REPORT_KEY,
    build_qa_report_asset,
    build_verified_asset,
    circuit_breaker_check,
)
from crm_assets.defs.records import build_record_assets
from crm_assets.defs.resources import build_resources
from crm_assets.defs.snapshots import build_snapshot_assets
from crm_assets.defs.sync_assets import FLOW_TAG, build_sync_assets
from crm_assets.settings import DEFAULTS, Settings
from crm_assets.sync.selection import read_selection

#: A retried run (instance run retries) starts over: it re-reads and re-plans under the
#: flow's lease, never writing an old plan.
RETRY_ALL_STEPS = {"dagster/retry_strategy": "ALL_STEPS"}


def build_definitions(settings: Settings) -> dg.Definitions:
    """Everything Dagster loads, for one configuration."""
    # EnvVar needs the variables set: unset ones take their documented demo default
    for name, default in DEFAULTS.items():
        if default:
            os.environ.setdefault(name, default)
    selection = read_selection(settings.spec_paths, settings.skip_unsupported)
    mappings = selection.mappings
    connectors = {
        obj.system_key: connector_by_key(obj.system_key) for m in mappings for obj in (m.a, m.b)
    }
    by_name = {m.name: m for m in mappings}
    sync_assets = [
        asset
        for m in mappings
        for asset in (
            *build_sync_assets(m, [by_name[r] for r in m.references]),
            build_verified_asset(m),
            *build_record_assets(m),
        )
    ]
    jobs = [
        dg.define_asset_job(
            f"sync_{m.name}",
            tags={FLOW_TAG: m.name, **RETRY_ALL_STEPS},
            # the QA report too, so that a sensor-started run leaves it current
            selection=dg.AssetSelection.groups(m.name)
            | dg.AssetSelection.assets(m.a.asset_path, m.b.asset_path, QA_REPORT_KEY),
            description=f"Snapshot both sides and sync '{m.title}'.",
        )
        for m in mappings
    ]
    jobs.append(
        dg.define_asset_job(
            "sync_all",
            selection=dg.AssetSelection.all(),
            description="Every flow.",
            tags={FLOW_TAG: "all", **RETRY_ALL_STEPS},
        )
    )
    sensors, schedules = build_automation(mappings, {j.name: j for j in jobs})
    return dg.Definitions(
        sensors=sensors,
        schedules=schedules,
        assets=[
            *build_snapshot_assets(mappings),
            *(a for d in selection.documents for a in build_flow_assets(d)),
            *sync_assets,
            build_qa_report_asset(selection),
        ],
        asset_checks=[circuit_breaker_check(m) for m in mappings],
        jobs=jobs,
        resources=build_resources(connectors.values(), settings.data().url, settings.state_url),
        # one process per run: a sync is a short chain of steps, and a subprocess per
        # step would cost more than the steps themselves (edit-to-visible latency)
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What Dagster loads: built when asked, so importing this module never fails on a
    bad document (the CLI turns that into one line; the UI shows it as a load error)."""
    return build_definitions(Settings.from_env())
