"""Per-flow sync assets: mapped → reconciled (the plan) → writes to CRMOffice → writes to Custom CRM.

Thin wiring: every step calls :mod:`crm_assets.sync`. The plan is an asset of
its own, so it can be looked at before anything is written (a dry run stops
there). A flow whose references go through another flow waits for that flow's
writes, so Products/Companies sync before Contacts.
"""

from typing import Any

import dagster as dg
import polars as pl

from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import Plan, ReconcileOptions
from crm_assets.sync import (
    FlowWriter,
    WriteResult,
    load_plan,
    map_flow,
    plan_flow,
    save_plan,
)

WRITE_SIDES = (("b", "crm_office"), ("a", "custom_crm"))  # CRMOffice first, then Custom CRM


class ReconcileConfig(dg.Config):
    """How this run plans: a dry run plans only; ``force`` overrides the circuit breaker."""

    mode: str = "full"
    dry_run: bool = False
    force: bool = False
    propagate_deletes: bool = False
    priority: str = "a"
    max_update_share: float = 0.5


def flow_key(mapping: FlowMapping, step: str) -> dg.AssetKey:
    return dg.AssetKey([mapping.name, step])


def last_write_key(mapping: FlowMapping) -> dg.AssetKey:
    return flow_key(mapping, f"writes_to_{WRITE_SIDES[-1][1]}")


def markdown_table(frame: pl.DataFrame, limit: int = 10) -> str:
    """A small Markdown table of a frame's first rows, for the UI."""
    if frame.height == 0:
        return "_none_"
    sample = frame.head(limit)
    header = "| " + " | ".join(sample.columns) + " |"
    rule = "|" + "---|" * len(sample.columns)
    rows = [
        "| " + " | ".join("" if v is None else str(v).replace("|", "\\|")[:60] for v in row) + " |"
        for row in sample.iter_rows()
    ]
    more = [f"\n_{frame.height - limit} more_"] if frame.height > limit else []
    return "\n".join([header, rule, *rows, *more])


def planmarkdown_table(plan: Plan) -> str:
    """The plan as an operator reads it: counts, then samples of each part."""
    lines = [f"### Plan of `{plan.flow}`", ""]
    if plan.blocked:
        lines += [f"**Blocked:** {plan.blocked}", ""]
    if plan.read_only:
        lines += ["**Read only / dry run:** nothing will be written.", ""]
    lines += ["| what | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in plan.counts.items()]
    show = ["a_id", "b_id", "new_link", "write_a", "write_b"]
    for title, frame in (
        ("Updates and new links", plan.pairs.select(show)),
        ("Creates in Custom CRM (from CRMOffice)", plan.creates["a"]),
        ("Creates in CRMOffice (from Custom CRM)", plan.creates["b"]),
        ("Conflicts", plan.conflicts),
        ("Ambiguous matches", plan.ambiguous),
        ("Deferred", plan.deferred),
        ("Failed", plan.failed),
    ):
        lines += ["", f"#### {title}", "", markdown_table(frame)]
    return "\n".join(lines)


def build_sync_assets(mapping: FlowMapping, after: list[FlowMapping]) -> list[dg.AssetsDefinition]:
    """The mapped, reconciled and writes assets of one flow."""
    group = mapping.name
    snapshots = [dg.AssetKey(mapping.a.asset_path), dg.AssetKey(mapping.b.asset_path)]

    @dg.asset(
        key=flow_key(mapping, "mapped"),
        group_name=group,
        deps=[*snapshots, flow_key(mapping, "dataflow"), *[last_write_key(m) for m in after]],
        kinds={"polars", "parquet"},
        required_resource_keys={"storage"},
        description=f"Both sides of '{mapping.title}' projected onto its properties, typed.",
    )
    def mapped(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        a, b = map_flow(mapping, storage.snapshots(), storage.state())
        folder = storage.flow_dir(mapping.name)
        folder.mkdir(parents=True, exist_ok=True)
        a.write_parquet(folder / "mapped_a.parquet")
        b.write_parquet(folder / "mapped_b.parquet")
        meta: dict[str, Any] = {}
        for side, frame in (("custom_crm", a), ("crm_office", b)):
            meta[f"{side}_records"] = frame.filter(~pl.col("deleted")).height
            meta[f"{side}_conversion_errors"] = frame.filter(pl.col("error").is_not_null()).height
            meta[f"{side}_unresolved_references"] = frame.filter(pl.col("unresolved")).height
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        key=flow_key(mapping, "reconciled"),
        group_name=group,
        deps=[mapped],
        kinds={"polars"},
        required_resource_keys={"storage"},
        description=f"The plan of '{mapping.title}': links, merges, creates, conflicts.",
    )
    def reconciled(
        context: dg.AssetExecutionContext, config: ReconcileConfig
    ) -> dg.MaterializeResult:
        storage = context.resources.storage
        folder = storage.flow_dir(mapping.name)
        a = pl.read_parquet(folder / "mapped_a.parquet")
        b = pl.read_parquet(folder / "mapped_b.parquet")
        options = ReconcileOptions(
            mode="read_only" if config.dry_run else config.mode,
            force=config.force,
            propagate_deletes=config.propagate_deletes,
            priority=config.priority,
            max_update_share=config.max_update_share,
        )
        plan = plan_flow(mapping, a, b, storage.state(), options)
        plan_dir = folder / "plan"
        save_plan(plan, plan_dir)
        (plan_dir / f"confirmed_{WRITE_SIDES[0][0]}.parquet").unlink(missing_ok=True)
        return dg.MaterializeResult(
            metadata={
                **{k: int(v) for k, v in plan.counts.items()},
                "blocked": plan.blocked or "no",
                "dry_run": config.dry_run,
                "plan": dg.MetadataValue.md(planmarkdown_table(plan)),
            }
        )

    assets = [mapped, reconciled]
    previous: dg.AssetsDefinition = reconciled
    for side, system_key in WRITE_SIDES:
        assets.append(_writes_asset(mapping, side, system_key, previous))
        previous = assets[-1]
    return assets


def _writes_asset(
    mapping: FlowMapping, side: str, system_key: str, upstream: dg.AssetsDefinition
) -> dg.AssetsDefinition:
    first = side == WRITE_SIDES[0][0]
    system = mapping.side(side).system

    @dg.asset(
        key=flow_key(mapping, f"writes_to_{system_key}"),
        group_name=mapping.name,
        deps=[upstream],
        kinds={"python"},
        required_resource_keys={"storage", system_key},
        description=f"The plan of '{mapping.title}' applied to {system}.",
    )
    def writes(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        plan_dir = storage.flow_dir(mapping.name) / "plan"
        plan = load_plan(plan_dir)
        confirmed_path = plan_dir / f"confirmed_{WRITE_SIDES[0][0]}.parquet"
        confirmed_other = None
        if not first and confirmed_path.exists():
            confirmed_other = set(pl.read_parquet(confirmed_path).get_column("a_id").to_list())
        with getattr(context.resources, system_key).client() as client:
            writer = FlowWriter(
                mapping,
                plan,
                storage.state(),
                storage.snapshots(),
                client,
                side,
                context.run.run_id,
            )
            result, confirmed = writer.run(confirmed_other)
        if first:
            pl.DataFrame({"a_id": sorted(confirmed)}, schema={"a_id": pl.String}).write_parquet(
                confirmed_path
            )
        return dg.MaterializeResult(metadata=write_metadata(result))

    return writes


def write_metadata(result: WriteResult) -> dict[str, Any]:
    failures = pl.DataFrame(result.failures, schema=["id", "action", "message"], orient="row")
    return {
        **result.counts(),
        "skipped": result.skipped or "no",
        "failures": dg.MetadataValue.md(markdown_table(failures)),
    }
