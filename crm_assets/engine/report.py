"""The QA report: the dataflow document rendered as a checklist with each row's result."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from crm_assets.engine.checks import check_name
from crm_assets.engine.document import DataflowDocument

# words beside the symbols: a terminal or browser without an emoji font still reads them
PASS, FAIL, WARN, UNKNOWN = "✅ PASS", "❌ FAIL", "⚠️ WARN", "❔ NOT CHECKED"
SKIPPED = "⏭️ SKIPPED"


def _mark(result: Mapping[str, Any] | None) -> str:
    if result is None:
        return UNKNOWN
    if result["passed"]:
        return PASS
    return FAIL if result["severity"] == "error" else WARN


def _counts(result: Mapping[str, Any] | None) -> str:
    if result is None:
        return "not checked yet"
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result["counts"].items())


def render_qa_report(
    document: DataflowDocument,
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    generated: datetime,
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Markdown: per flow, per property row, the agreement and type checks; then flow checks.

    ``results``: flow name → check name → ``{"passed", "severity", "counts"}``;
    ``skipped``: flow name → why it cannot run (no connector): shown as skipped,
    never as passed.
    """
    skipped = skipped or {}
    lines = [
        f"# QA report: {document.title}",
        "",
        f"Generated {generated.isoformat(timespec='seconds')}.",
    ]
    lines += [
        "",
        f"{PASS}: passed · {FAIL}: failed (error) · {WARN}: failed (warning) · "
        f"{UNKNOWN}: not checked yet · {SKIPPED}: flow not synced",
        "",
    ]
    total = failed = 0
    for flow in document.flows:
        mine = results.get(flow.name, {})
        lines += [f"## {flow.title}", ""]
        if flow.name in skipped:
            lines += [f"**{SKIPPED}**: {skipped[flow.name]}", ""]
        elif not flow.enabled_properties:
            lines += [f"**{WARN}: no properties to sync**: the property table is empty.", ""]
        if flow.merge:
            merge = "; ".join(f"`{m.source}` = `{m.target}`" for m in flow.merge)
            lines += [f"Merge on {merge}.", ""]
        lines += [
            f"| {flow.source.system} {flow.source.entity} | {flow.target.system} {flow.target.entity} "
            "| type | agree | type ok | details |",
            "|---|---|---|---|---|---|",
        ]
        for row in flow.properties:
            if row.disabled:
                lines.append(
                    f"| `{row.source}` | `{row.target}` | {row.type or 'N/A'} | disabled | disabled "
                    f"| not synced: {row.disabled} |"
                )
                continue
            agree = mine.get(check_name(row.target, "agrees"))
            typed = mine.get(check_name(row.target, "type"))
            for r in (agree, typed):
                total += 1
                failed += r is not None and not r["passed"]
            lines.append(
                f"| `{row.source}` | `{row.target}` | {row.type or 'N/A'} | {_mark(agree)} | {_mark(typed)} "
                f"| {_counts(agree)}; {_counts(typed)} |"
            )
        if not flow.properties:
            lines.append("| _no property rows_ | | | | | |")
        property_checks = {
            check_name(r.target, w) for r in flow.properties for w in ("agrees", "type")
        }
        others = {k: v for k, v in mine.items() if k not in property_checks}
        if others:
            lines += ["", "| flow check | result | details |", "|---|---|---|"]
            for name, r in others.items():
                total += 1
                failed += not r["passed"]
                lines.append(f"| {r.get('description', name)} | {_mark(r)} | {_counts(r)} |")
        lines.append("")
    summary = f"\n**{total - failed} of {total} checks pass.**"
    if skipped:
        summary += f" {len(skipped)} flow(s) skipped: no connector."
    lines.insert(3, summary)
    return "\n".join(lines)
