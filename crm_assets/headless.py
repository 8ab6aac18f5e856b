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

from crm_assets.connectors import CONNECTORS, UnsupportedFlow, with_fix
from crm_assets.definitions import build_definitions
from crm_assets.defs.sync_assets import VIA_TAG
from crm_assets.engine.checks import NO_PROPERTIES
from crm_assets.engine.document import DocumentError, SelectionError
from crm_assets.engine.mapping import MappingError
from crm_assets.engine.storage import StorageError
from crm_assets.settings import Settings
from crm_assets.sync import FlowFiles
from crm_assets.sync.preview import preview
from crm_assets.sync.selection import read_selection

#: The metadata a summary line shows per asset, when present.
SUMMARY_KEYS = (
    "dagster/row_count",
    "new",
    "changed",
    "deleted",
    "links_new",
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
    run_id: str = ""
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: "<asset>:<check>" → (passed, severity, metadata)
    checks: dict[str, tuple[bool, str, dict[str, Any]]] = field(default_factory=dict)

    def failed_checks(self) -> list[str]:
        return sorted(name for name, (passed, _s, _m) in self.checks.items() if not passed)

    def of(self, asset: str) -> dict[str, Any]:
        return self.metadata.get(asset, {})


#: The steps of a flow a dry run materializes: up to the plan.
DRY_RUN_STEPS = ("dataflow", "mapped", "reconciled")


def execute_sync(
    flow: str | None = None,
    dry_run: bool = False,
    full_rescan: bool = False,
    force: bool = False,
    settings: Settings | None = None,
    rebuild_links: bool = False,
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
    snapshot_groups = {c.key for c in CONNECTORS}
    ops: dict[str, Any] = {}
    selection: list[dg.AssetKey] = []
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        name = op_name(key)
        if name not in in_job:
            continue
        if dry_run and key.path[0] not in snapshot_groups and key.path[-1] not in DRY_RUN_STEPS:
            continue  # a dry run plans: no write, no verification, no report
        selection.append(key)
        if key.path[-1] == "reconciled":
            ops[name] = {
                "config": {
                    "dry_run": dry_run,
                    "force": force,
                    "rebuild_links": rebuild_links,
                    "full_plan": full_rescan,
                }
            }
        elif key.path[0] in snapshot_groups:
            ops[name] = {"config": {"full_rescan": full_rescan}}
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    result = job.execute_in_process(
        run_config={"ops": ops, "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        instance=instance,
        raise_on_error=False,
        tags={VIA_TAG: "crm-assets sync"},
        asset_selection=selection if dry_run else None,
    )
    outcome = SyncOutcome(success=result.success, run_id=result.run_id)
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
            outcome.failures.append(f"{event.step_key}: {root_cause(err)}")
    return outcome


def root_cause(error: Any) -> str:
    """The innermost error's first line, without its exception class: what went wrong,
    prefixed by its kind in brackets when it is one the CLI knows (``[CrmAuthError] ...``)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    if getattr(error, "cls_name", "") == "DagsterExecutionInterruptedError":
        return INTERRUPTED
    lines = (getattr(error, "message", "") or "").strip().splitlines()
    if not lines:
        return "see the run log"
    head, sep, rest = lines[0].partition(": ")
    text = rest if sep and "." in head and " " not in head else lines[0]
    kind = getattr(error, "cls_name", "") or ""
    return f"[{kind}] {text}" if kind in KNOWN_ERRORS else text


#: How a step stopped by Ctrl-C (or a terminate request) reads.
INTERRUPTED = (
    "interrupted: the writes the CRMs confirmed are kept and linked; "
    "run `crm-assets sync` again to finish"
)

#: Exception classes whose failures the CLI reports as one line with an exit code of its own.
KNOWN_ERRORS = {
    "CrmAuthError": "credentials",
    "CrmUnavailable": "unreachable",
    "StorageError": "storage",
    "StateUnavailable": "state",
}


#: How a step failure caused by another writer's lease reads (see crm_assets.engine.lease).
LEASE_HELD = " is being synced by "

#: How a refusal to sync over a lost state reads (see crm_assets.sync.planning).
STATE_REFUSED = "the state database has no links for this flow"

#: Exit codes of ``crm-assets sync`` per kind of failure (listed in the README).
EXIT = {
    "run_failed": 1,
    "document": 2,
    "unsupported": 3,
    "lease_held": 4,
    "state_refused": 5,
    "breaker": 6,
    "credentials": 7,
    "unreachable": 8,
    "storage": 9,
    "state": 10,
}


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def print_preview(settings: Settings, run_id: str, limit: int = 20) -> None:
    """Per flow, the first records a dry run would create or change (nothing was written)."""
    for mapping in read_selection(settings.spec_paths, settings.skip_unsupported).mappings:
        files = FlowFiles.of_run(settings.data(), mapping.name, run_id)
        if files.plan_written_at() is None:
            continue
        lines = preview(files.load_plan(), mapping, limit)
        print(f"{mapping.name}: would write " + (f"(first {limit}):" if lines else "nothing"))
        for line in lines:
            print(f"  {line}")


def run_sync(
    flow: str | None = None,
    dry_run: bool = False,
    full_rescan: bool = False,
    force: bool = False,
    rebuild_links: bool = False,
) -> int:
    """``crm-assets sync``: run and print a summary; 0 when the run succeeded.

    Known failures are one line on stderr and an exit code of their own (:data:`EXIT`).
    """
    settings = Settings.from_env()
    try:
        data = settings.data()
        print(f"data directory: {data.url}", flush=True)
        data.check()
        outcome = execute_sync(flow, dry_run, full_rescan, force, settings, rebuild_links)
    except StorageError as exc:
        return _fail(EXIT["storage"], str(exc))
    except KeyError as exc:
        return _fail(EXIT["document"], f"{exc.args[0]} (choose with --flow)")
    except (DocumentError, MappingError, SelectionError) as exc:
        return _fail(EXIT["document"], f"{exc} (fix the document or CRM_SYNC_SPEC)")
    except UnsupportedFlow as exc:
        return _fail(
            EXIT["unsupported"],
            f"{exc} (sync another document, or set CRM_SYNC_SKIP_UNSUPPORTED=1 to skip such flows)",
        )
    except OSError as exc:
        name = exc.filename or "the document"
        return _fail(EXIT["document"], f"cannot read {name}: {exc.strerror} (check CRM_SYNC_SPEC)")
    for asset, metadata in outcome.metadata.items():
        shown = {
            k: v
            for k, v in metadata.items()
            if k in SUMMARY_KEYS or k.startswith(("updates_in_", "creates_in_"))
        }
        parts = ", ".join(f"{k.removeprefix('dagster/')}={v}" for k, v in shown.items())
        print(f"{asset:45s} {parts}".rstrip())
    if dry_run:
        print_preview(settings, outcome.run_id)
    failed = outcome.failed_checks()
    qa = outcome.of("qa/qa_report")
    if qa:  # the QA report's own numbers, so the two never disagree
        print(
            f"QA report (every flow of the document): {qa['checks'] - qa['failed']} of "
            f"{qa['checks']} checks pass"
        )
    print(f"checks of this run: {len(outcome.checks) - len(failed)} of {len(outcome.checks)} pass")
    for name in failed:
        _passed, severity, metadata = outcome.checks[name]
        counts = {k: v for k, v in metadata.items() if isinstance(v, int) and v}
        reason = metadata.get("reason")
        print(f"  {severity:5s} {name} {reason if isinstance(reason, str) else counts}")
    for name in outcome.failed_checks():
        if name.endswith(f":{NO_PROPERTIES}"):
            print(
                f"{name.split('/')[0]}: no properties to sync (the flow's property table is empty)"
            )
    for marker, kind in (
        (LEASE_HELD, "lease_held"),
        (STATE_REFUSED, "state_refused"),
        ("circuit breaker: ", "breaker"),
        *((f"[{cls}] ", kind) for cls, kind in KNOWN_ERRORS.items()),
    ):
        known = [f for f in outcome.failures if marker in f]
        if known:  # one line, as for any known failure
            message = known[0].split(": ", 1)[1]
            if marker.startswith("["):
                message = message.removeprefix(marker)
            if kind in ("credentials", "unreachable"):
                message = with_fix(kind, message)
            return _fail(EXIT[kind], message)
    for failure in outcome.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 0 if outcome.success else EXIT["run_failed"]
