"""``crm-assets sync``: the same assets as the UI, materialized in-process.

Uses the Dagster instance of ``DAGSTER_HOME`` when set (runs show in the UI),
an ephemeral one otherwise. Per-record failures are reported, not fatal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
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


@dataclass
class SyncOutcome:
    """What one in-process sync did: success, metadata per asset, failed steps."""

    success: bool
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: "<asset>:<check>" → (passed, severity, metadata)
    checks: dict[str, tuple[bool, str, dict[str, Any]]] = field(default_factory=dict)

    def failed_checks(self) -> list[str]:
        return sorted(name for name, (passed, _s, _m) in self.checks.items() if not passed)

    def of(self, asset: str) -> dict[str, Any]:
        return self.metadata.get(asset, {})


def execute_sync(
    flow: str | None = None,
    dry_run: bool = False,
    full_rescan: bool = False,
    force: bool = False,
    settings: Settings | None = None,
) -> SyncOutcome:
    """Materialize one flow (or all) in-process against the configured CRMs."""
    defs = build_definitions(settings or Settings.from_env())
    job_name = f"sync_{flow}" if flow else "sync_all"
    names = {j.name for j in defs.resolve_all_job_defs()}
    if job_name not in names:
        known = ", ".join(sorted(n.removeprefix("sync_") for n in names if n.startswith("sync_")))
        raise KeyError(f"no flow {flow!r} (flows: {known})")
    job = defs.resolve_job_def(job_name)
    in_job = {node.name for node in job.graph.node_defs}
    ops: dict[str, Any] = {}
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        name = op_name(key)
        if name not in in_job:
            continue
        if key.path[-1] == "reconciled":
            ops[name] = {"config": {"dry_run": dry_run, "force": force}}
        elif key.path[0] in ("custom_crm", "crm_office"):
            ops[name] = {"config": {"full_rescan": full_rescan}}
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    result = job.execute_in_process(
        run_config={"ops": ops, "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        instance=instance,
        raise_on_error=False,
    )
    outcome = SyncOutcome(success=result.success)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        outcome.metadata[mat.asset_key.to_user_string()] = {
            k: v.value for k, v in mat.metadata.items()
        }
    for evaluation in result.get_asset_check_evaluations():
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        outcome.checks[name] = (
            evaluation.passed,
            evaluation.severity.value,
            {k: v.value for k, v in evaluation.metadata.items()},
        )
    for event in result.all_events:
        if event.is_failure and event.step_key:
            err = event.event_specific_data.error if event.event_specific_data else None  # type: ignore[union-attr]
            lines = (getattr(err, "message", "") or "").strip().splitlines()
            outcome.failures.append(
                f"{event.step_key}: {lines[-1] if lines else 'see the run log'}"
            )
    return outcome


def run_sync(
    flow: str | None = None, dry_run: bool = False, full_rescan: bool = False, force: bool = False
) -> int:
    """``crm-assets sync``: run and print a summary; 0 when the run succeeded."""
    try:
        outcome = execute_sync(flow, dry_run, full_rescan, force)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    for asset, metadata in outcome.metadata.items():
        shown = {k: v for k, v in metadata.items() if k in SUMMARY_KEYS}
        parts = ", ".join(f"{k.removeprefix('dagster/')}={v}" for k, v in shown.items())
        print(f"{asset:45s} {parts}".rstrip())
    failed = outcome.failed_checks()
    print(f"checks: {len(outcome.checks) - len(failed)} of {len(outcome.checks)} pass")
    for name in failed:
        _passed, severity, metadata = outcome.checks[name]
        counts = {k: v for k, v in metadata.items() if isinstance(v, int)}
        print(f"  {severity:5s} {name} {counts}")
    for failure in outcome.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 0 if outcome.success else 1
