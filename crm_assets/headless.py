"""``crm-assets sync``: the same assets as the UI, materialized in-process.

Uses the Dagster instance of ``DAGSTER_HOME`` when set (runs show in the UI),
an ephemeral one otherwise. Per-record failures are reported, not fatal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import dagster as dg

from crm_assets.definitions import build_definitions
from crm_assets.settings import Settings

#: The metadata a summary line shows per asset, when present.
SUMMARY_KEYS = (
    "dagster/row_count",
    "new",
    "changed",
    "deleted",
    "links_new",
    "updates_a",
    "updates_b",
    "creates_a",
    "creates_b",
    "conflicts",
    "ambiguous",
    "created",
    "updated",
    "unchanged",
    "deferred",
    "failed",
    "skipped",
    "blocked",
)


def op_name(key: dg.AssetKey) -> str:
    return "__".join(key.path)


def run_sync(
    flow: str | None = None, dry_run: bool = False, full_rescan: bool = False, force: bool = False
) -> int:
    """Materialize one flow (or all) and print a summary; 0 when the run succeeded."""
    defs = build_definitions(Settings.from_env())
    job_name = f"sync_{flow}" if flow else "sync_all"
    try:
        job = defs.resolve_job_def(job_name)
    except Exception:  # dagster raises its own error type for unknown jobs
        names = sorted(j.name for j in defs.resolve_all_job_defs() if j.name.startswith("sync_"))
        print(f"error: no flow {flow!r}; jobs: {', '.join(names)}", file=sys.stderr)
        return 2
    graph = defs.resolve_asset_graph()
    ops: dict[str, Any] = {}
    for key in graph.get_all_asset_keys():
        if key.path[-1] == "reconciled":
            ops[op_name(key)] = {"config": {"dry_run": dry_run, "force": force}}
        elif key.path[0] in ("custom_crm", "crm_office"):
            ops[op_name(key)] = {"config": {"full_rescan": full_rescan}}
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    selected = {op for op in ops if op in {n.name for n in job.graph.node_defs}} or None
    run_config = {"ops": {k: v for k, v in ops.items() if selected is None or k in selected}}
    result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        assert mat is not None
        shown = {k: v.value for k, v in mat.metadata.items() if k in SUMMARY_KEYS}
        parts = ", ".join(f"{k.removeprefix('dagster/')}={v}" for k, v in shown.items())
        print(f"{mat.asset_key.to_user_string():45s} {parts}")
    if not result.success:
        for event in result.all_events:
            if event.is_failure and event.step_key:
                err = event.event_specific_data.error if event.event_specific_data else None
                message = getattr(err, "message", "").strip().splitlines()
                print(
                    f"FAILED {event.step_key}: {message[-1] if message else 'see the run log'}",
                    file=sys.stderr,
                )
        return 1
    return 0
