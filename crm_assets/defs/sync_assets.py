"""Per-flow sync assets: mapped → reconciled (the plan) → writes to both systems (one
step, both CRMs at once, an asset per CRM).

Thin wiring: every step calls :mod:`crm_assets.sync`. The plan is an asset of
its own, so it can be looked at before anything is written (a dry run stops
there). A flow whose references go through another flow waits for that flow's
writes, so Products/Companies sync before Contacts.
"""

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import dagster as dg
import polars as pl

from crm_assets.connector import normalize_name
from crm_assets.engine.lease import is_held, release_held
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.reconcile import Plan, ReconcileOptions
from crm_assets.sync import (
    WRITE_ORDER,
    WriteResult,
    confirm_plan,
    mapped_sides,
    named_counts,
    plan_flow,
    reference_links,
    write_flow,
)
from crm_assets.sync.guard import check_plan_current, refresh_if_stale, take_flow
from crm_assets.sync.planning import StateRefused
from crm_assets.sync.snapshots import read_snapshot

#: The run tag saying what started a run (``crm-assets sync`` sets it).
VIA_TAG = "crm_sync/via"
#: The run tag naming the flow a run syncs: instances limit it to one run per value.
FLOW_TAG = "crm_sync/flow"


class ReconcileConfig(dg.Config):
    """How this run plans: a dry run plans only; ``force`` overrides the circuit breaker."""

    mode: str = "full"
    dry_run: bool = False
    force: bool = False
    #: after a lost state: relink from the CRMs (merge criteria, then records whose every
    #: mapped value agrees), write and create nothing
    rebuild_links: bool = False
    propagate_deletes: bool = False
    #: the system whose value wins a conflict at the same modification time (as the
    #: document names it); empty: the document's source system
    priority: str = ""
    max_update_share: float = 0.5
    #: plan every record, not only what changed since the last confirmed run (the nightly
    #: rescan and `crm-assets sync --full-rescan` set it)
    full_plan: bool = False


def flow_pool(mapping: FlowMapping) -> str:
    """The Dagster concurrency pool of a flow's planning and writing steps."""
    return f"crm_sync_{mapping.name}"


def earlier_runs(context: dg.AssetExecutionContext, mapping: FlowMapping) -> str | None:
    """What says the flow was synced before, besides the state database: the data
    folder's marker, or a materialization of its writes in the Dagster instance."""
    storage = context.resources.storage
    if storage.synced_before(mapping.name):
        return f"the data folder {storage.data_url} holds earlier syncs of it"
    if context.instance.get_latest_materialization_event(last_write_key(mapping)) is not None:
        return "the Dagster instance records earlier syncs of it"
    return None


def via_of(context: dg.AssetExecutionContext) -> str:
    """What started the run, as the lease names its holder."""
    return str(context.run.tags.get(VIA_TAG, "Dagster run"))


def priority_side(mapping: FlowMapping, system: str) -> str:
    """The engine's side of the priority system (a name the flow does not hold is an error)."""
    if not system:
        return "a"
    for side in ("a", "b"):
        if normalize_name(mapping.side(side).system) == normalize_name(system):
            return side
    raise dg.Failure(
        f"priority {system!r} is not a system of flow {mapping.name} "
        f"({mapping.a.system} or {mapping.b.system}): fix the run config 'priority'"
    )


def flow_key(mapping: FlowMapping, step: str) -> dg.AssetKey:
    return dg.AssetKey([mapping.name, step])


def writes_key(mapping: FlowMapping, side: str) -> dg.AssetKey:
    return flow_key(mapping, f"writes_to_{mapping.side(side).system_key}")


def last_write_key(mapping: FlowMapping) -> dg.AssetKey:
    return writes_key(mapping, WRITE_ORDER[-1])


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


def plan_markdown(plan: Plan, mapping: FlowMapping) -> str:
    """The plan as an operator reads it: counts, then samples of each part."""
    lines = [f"### Plan of `{plan.flow}`", ""]
    if plan.blocked:
        lines += [f"**Blocked:** {plan.blocked}", ""]
    if plan.read_only:
        lines += ["**Read only / dry run:** nothing will be written.", ""]
    lines += ["| what | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in named_counts(plan, mapping).items()]
    a, b = mapping.a.system, mapping.b.system
    names = {"a": a, "b": b}
    pairs = plan.pairs.select(
        pl.col("a_id").alias(f"{a} id"),
        pl.col("b_id").alias(f"{b} id"),
        "new_link",
        pl.col("write_a").alias(f"writes to {a}"),
        pl.col("write_b").alias(f"writes to {b}"),
    )
    conflicts = plan.conflicts.select(
        pl.col("a_id").alias(f"{a} id"),
        pl.col("b_id").alias(f"{b} id"),
        "field",
        pl.col("a_value").alias(f"{a} value"),
        pl.col("b_value").alias(f"{b} value"),
        pl.col("winner").replace_strict(names, default=None).alias("winner"),
    )

    def by_system(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(pl.col("side").replace_strict(names, default=None))

    for title, frame in (
        ("Updates and new links", pairs),
        (f"Creates in {a} (from {b})", plan.creates["a"]),
        (f"Creates in {b} (from {a})", plan.creates["b"]),
        ("Conflicts", conflicts),
        ("Ambiguous matches", by_system(plan.ambiguous)),
        ("Deferred", by_system(plan.deferred)),
        ("Failed", by_system(plan.failed)),
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
        required_resource_keys={"storage", mapping.a.system_key, mapping.b.system_key},
        pool=flow_pool(mapping),
        description=f"Both sides of '{mapping.title}' projected onto its properties, typed. "
        "A run that writes the flow takes the flow's lease here (one writer per flow).",
    )
    def mapped(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        state, store = storage.state(), storage.snapshots()
        identity = state.identity(
            data_dir=storage.data_url, instance=os.environ.get("DAGSTER_HOME") or "ephemeral"
        )
        meta: dict[str, Any] = {"state_created": identity.get("created_at", "")}
        if writes_key(mapping, WRITE_ORDER[0]) in context.job_def.asset_layer.selected_asset_keys:
            lease = take_flow(state, mapping, context.run.run_id, via_of(context))
            meta["lease"] = lease.holder

            def read(obj: SourceObject) -> None:
                with getattr(context.resources, obj.system_key).client() as client:
                    read_snapshot(client, obj, store, state)

            if refresh_if_stale(lease, mapping, store, read):
                context.log.info("another run wrote this flow meanwhile: snapshots read again")
                meta["snapshots_read_again"] = True
        refs = reference_links(state, mapping)
        a, b = mapped_sides(mapping, store, refs)
        storage.flow_files(mapping.name, context.run.run_id).save_mapped(a, b)
        context.log.info(
            f"mapped {a.fresh.height} {mapping.a.system} and {b.fresh.height} "
            f"{mapping.b.system} records anew"
        )
        for side, mapped in ((mapping.a.system_key, a), (mapping.b.system_key, b)):
            meta.update({f"{side}_{k}": v for k, v in mapped.counts().items()})
            meta[f"{side}_mapped_anew"] = mapped.fresh.height
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        key=flow_key(mapping, "reconciled"),
        group_name=group,
        deps=[mapped],
        kinds={"polars"},
        required_resource_keys={"storage"},
        pool=flow_pool(mapping),
        description=f"The plan of '{mapping.title}': links, merges, creates, conflicts.",
    )
    def reconciled(
        context: dg.AssetExecutionContext, config: ReconcileConfig
    ) -> dg.MaterializeResult:
        storage = context.resources.storage
        files = storage.flow_files(mapping.name, context.run.run_id)
        a, b = files.mapped_sides()
        options = ReconcileOptions(
            mode="read_only" if config.dry_run else config.mode,
            force=config.force,
            rebuild_links=config.rebuild_links,
            propagate_deletes=config.propagate_deletes,
            priority=priority_side(mapping, config.priority),
            max_update_share=config.max_update_share,
        )
        try:
            plan = plan_flow(
                mapping,
                a,
                b,
                storage.state(),
                options,
                earlier_runs(context, mapping),
                full=config.full_plan,
            )
        except StateRefused as exc:
            raise dg.Failure(description=str(exc)) from None
        files.save_plan(plan)
        context.log.info(
            f"{plan.scope} plan of {plan.scoped_records} records: "
            + ", ".join(f"{k}={v}" for k, v in named_counts(plan, mapping).items() if v)
            + (f"; blocked: {plan.blocked}" if plan.blocked else "")
        )
        return dg.MaterializeResult(
            metadata={
                **named_counts(plan, mapping),
                "blocked": plan.blocked or "no",
                "dry_run": config.dry_run,
                "scope": plan.scope,
                "records_in_scope": plan.scoped_records,
                "base_values_read": plan.base_values_read,
                "plan": dg.MetadataValue.md(plan_markdown(plan, mapping)),
            }
        )

    return [mapped, reconciled, _writes_asset(mapping)]


def _writes_asset(mapping: FlowMapping) -> dg.AssetsDefinition:
    """One step writes both CRMs of the flow at once, one asset per CRM written."""
    systems = {side: mapping.side(side) for side in WRITE_ORDER}

    @dg.multi_asset(
        name=f"{mapping.name}__writes",
        specs=[
            dg.AssetSpec(
                writes_key(mapping, side),
                group_name=mapping.name,
                deps=[flow_key(mapping, "reconciled")],
                kinds={"python"},
                description=f"The plan of '{mapping.title}' applied to {obj.system} "
                "(written in one step with the flow's other CRM, at the same time).",
            )
            for side, obj in systems.items()
        ],
        required_resource_keys={"storage", *(obj.system_key for obj in systems.values())},
        pool=flow_pool(mapping),
    )
    def writes(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        storage = context.resources.storage
        run_id = context.run.run_id
        files = storage.flow_files(mapping.name, run_id)
        plan = files.load_plan()
        state = storage.state()
        if not is_held(mapping.name, run_id):  # a step re-executed on its own
            check_plan_current(
                take_flow(state, mapping, run_id, via_of(context)), files.plan_written_at()
            )
        if plan.blocked and not plan.read_only:
            raise dg.Failure(description=plan.blocked, metadata=named_counts(plan, mapping))
        # however this step ends, the storage's teardown gives the flow back
        with ExitStack() as stack:
            clients = {
                key: stack.enter_context(getattr(context.resources, key).client())
                for key in {obj.system_key for obj in systems.values()}
            }
            results = write_flow(
                mapping,
                plan,
                state,
                storage.snapshots(),
                clients,
                run_id,
                reference_links(state, mapping),
                progress=context.log.info,
            )
        if confirm_plan(state, plan, run_id):
            storage.mark_synced(mapping.name, run_id)
        release_held(run_id, mapping.name)
        for side, obj in systems.items():
            result = results[side]
            if result.failures:  # the run stays a success; the Runs list and its log say so
                report_dead_letters(context, mapping, obj.system, result)
            context.log.info(
                f"{obj.system}: {result.created} created, {result.updated} updated, "
                f"{result.deferred} deferred, {result.failed} failed"
            )
            yield dg.MaterializeResult(
                asset_key=writes_key(mapping, side), metadata=write_metadata(result)
            )

    return writes


#: The run tag counting the records a run could not write (they wait as dead letters).
DEAD_LETTERS_TAG = "crm_sync/dead_letters"


def report_dead_letters(
    context: dg.AssetExecutionContext, mapping: FlowMapping, system: str, result: WriteResult
) -> None:
    """A warning naming the failed records with their reasons, and a run tag with the count."""
    sample = "; ".join(f"{i} ({action}): {message}" for i, action, message in result.failures[:5])
    more = f" and {len(result.failures) - 5} more" if len(result.failures) > 5 else ""
    context.log.warning(
        f"{len(result.failures)} record(s) of {mapping.name} could not be written to {system} "
        f"and wait as dead letters (crm-assets dead-letters list --flow {mapping.name}): "
        f"{sample}{more}"
    )
    run_id = context.run.run_id
    run = context.instance.get_run_by_id(run_id)  # as tagged now (by other flows and sides too)
    earlier = int((run.tags if run else {}).get(DEAD_LETTERS_TAG, "0") or 0)
    context.instance.add_run_tags(run_id, {DEAD_LETTERS_TAG: str(earlier + len(result.failures))})


def write_metadata(result: WriteResult) -> dict[str, Any]:
    failures = pl.DataFrame(result.failures, schema=["id", "action", "message"], orient="row")
    return {
        **result.counts(),
        "skipped": result.skipped or "no",
        "failures": dg.MetadataValue.md(markdown_table(failures)),
    }
