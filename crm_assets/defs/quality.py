"""The QA checklist in Dagster: a ``verified`` asset per flow carrying the document's checks,
and the QA report rendering the document as a checklist.

The checks read both CRMs after the writes (verification snapshots of their
own, incremental), not the plan.
"""

import json
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from crm_assets.defs.sync_assets import flow_key, last_write_key, markdown_table
from crm_assets.engine.checks import CheckOutcome, check_catalog
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import FORCE_HINT
from crm_assets.engine.report import render_qa_report
from crm_assets.sync import named_counts, verify_flow
from crm_assets.sync.records import verified_unlinked
from crm_assets.sync.selection import Selection
from crm_assets.sync.snapshots import read_snapshot

SEVERITY = {"error": dg.AssetCheckSeverity.ERROR, "warn": dg.AssetCheckSeverity.WARN}
QA_REPORT_KEY = dg.AssetKey(["qa", "qa_report"])


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    metadata: dict[str, Any] = {**outcome.counts, "description": outcome.description}
    if outcome.sample is not None and outcome.sample.height:
        metadata["sample"] = dg.MetadataValue.md(markdown_table(outcome.sample))
    if outcome.column is not None:
        metadata["property"] = f"{outcome.column.a_field} -> {outcome.column.b_field}"
    return dg.AssetCheckResult(
        check_name=outcome.name,
        passed=outcome.passed,
        severity=SEVERITY[outcome.severity],
        metadata=metadata,
    )


#: The latest check results of a flow, in its folder (the QA report reads them).
CHECK_RESULTS = "checks.json"


def build_verified_asset(mapping: FlowMapping) -> dg.AssetsDefinition:
    """Re-reads both systems after the writes and runs the flow's QA checklist on them."""
    key = flow_key(mapping, "verified")
    specs = [
        dg.AssetCheckSpec(name, asset=key, description=description)
        for name, description in check_catalog(mapping).items()
    ]

    @dg.asset(
        key=key,
        group_name=mapping.name,
        deps=[last_write_key(mapping)],
        check_specs=specs,
        kinds={"polars"},
        required_resource_keys={"storage", mapping.a.system_key, mapping.b.system_key},
        description=f"What both CRMs hold for '{mapping.title}' after the writes, checked.",
    )
    def verified(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        store, state = storage.verification(), storage.state()
        for obj in (mapping.a, mapping.b):
            with getattr(context.resources, obj.system_key).client() as client:
                read_snapshot(client, obj, store, state)
        verification = verify_flow(mapping, store, state)
        storage.flow_files(mapping.name, context.run.run_id).save_unlinked(
            verified_unlinked(mapping, state, verification)
        )
        outcomes = verification.checks
        storage.flow_dir(mapping.name).write_text(
            json.dumps(
                {
                    o.name: {
                        "passed": o.passed,
                        "severity": o.severity,
                        "counts": o.counts,
                        "description": o.description,
                    }
                    for o in outcomes
                },
                indent=2,
            ),
            CHECK_RESULTS,
        )
        return dg.MaterializeResult(
            metadata={
                "linked_pairs": verification.linked,
                "disagreements": verification.disagreements.height,
                "checks_passed": sum(o.passed for o in outcomes),
                "checks_failed": sum(not o.passed for o in outcomes),
            },
            check_results=[check_result(o) for o in outcomes],
        )

    return verified


def build_qa_report_asset(selection: Selection) -> dg.AssetsDefinition:
    """The documents as a checklist, each row with its result: Markdown in the UI and a file."""
    mappings, skipped = selection.mappings, selection.flows.skipped

    @dg.asset(
        key=QA_REPORT_KEY,
        group_name="qa",
        deps=[flow_key(m, "verified") for m in mappings],
        kinds={"markdown"},
        required_resource_keys={"storage"},
        description=f"QA report of '{selection.title}': every row of the document with its result.",
    )
    def qa_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        results = {}
        for m in mappings:
            found = storage.flow_dir(m.name).read_text(CHECK_RESULTS)
            if found is not None:
                results[m.name] = json.loads(found)
        now, reasons = datetime.now(UTC), {f.name: f.reason for f in skipped}
        text = "\n\n".join(render_qa_report(d, results, now, reasons) for d in selection.documents)
        reports = storage.data().child("reports")
        reports.write_text(text, "qa-report.md")
        checks = [r for flow in results.values() for r in flow.values()]
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(text),
                "path": dg.MetadataValue.path(reports.uri("qa-report.md")),
                "checks": len(checks),
                "failed": sum(not r["passed"] for r in checks),
                "skipped_flows": len(skipped),
            }
        )

    return qa_report


def circuit_breaker_check(mapping: FlowMapping) -> dg.AssetChecksDefinition:
    """A plan that would change too much of one side: the writes step then fails the run
    with the reason as its message (not this check: its failure would say only that a
    blocking check failed)."""

    @dg.asset_check(
        asset=flow_key(mapping, "reconciled"),
        name="circuit_breaker",
        required_resource_keys={"storage"},
        description="the plan changes no more than the allowed share of either CRM's links; "
        f"when it does, nothing is written: {FORCE_HINT}",
    )
    def breaker(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        files = context.resources.storage.flow_files(mapping.name, context.run.run_id)
        meta = files.plan_meta()
        if meta is None:
            return dg.AssetCheckResult(passed=True, metadata={"plan": "none yet"})
        return dg.AssetCheckResult(
            passed=meta["blocked"] is None,
            severity=dg.AssetCheckSeverity.ERROR,
            description=meta["blocked"],
            metadata={
                "reason": meta["blocked"] or "within limits",
                **named_counts(meta["counts"][0], mapping),
            },
        )

    return breaker
