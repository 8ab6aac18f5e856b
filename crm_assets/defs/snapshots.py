"""Snapshot assets: one per source object a flow of the document reads."""

from collections.abc import Sequence

import dagster as dg

from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.objects import SourceObject
from crm_assets.sync.snapshots import read_snapshot


class SnapshotConfig(dg.Config):
    """``full_rescan`` re-reads everything, which is how hard deletes are found."""

    full_rescan: bool = False


#: A CRM clock further off than this (seconds) is worth a warning (DESIGN 5.3).
CLOCK_WARN_SECONDS = 5.0


def build_snapshot_asset(source: SourceObject) -> dg.AssetsDefinition:
    """The snapshot asset of one source object, e.g. ``custom_crm/contacts``."""
    key = dg.AssetKey(source.asset_path)

    @dg.asset(
        key=key,
        group_name=source.system_key,
        kinds={"parquet", "polars"},
        description=f"Every {source.system} {source.obj} record, kept up to date incrementally.",
        required_resource_keys={source.system_key, "storage"},
        metadata={"system": source.system, "object": source.obj},
        check_specs=[
            dg.AssetCheckSpec(
                "no_future_dated_records",
                asset=key,
                description=f"no {source.system} record is dated after {source.system}'s own "
                "now (such records are read again on every run until their time comes)",
            ),
            dg.AssetCheckSpec(
                "clock_in_step",
                asset=key,
                description=f"{source.system}'s clock is within {CLOCK_WARN_SECONDS:g} s of the "
                "sync host's (conflicts compare corrected times either way)",
            ),
        ],
    )
    def snapshot(context: dg.AssetExecutionContext, config: SnapshotConfig) -> dg.MaterializeResult:
        storage = context.resources.storage
        store, state = storage.snapshots(), storage.state()
        with getattr(context.resources, source.system_key).client() as client:
            run = read_snapshot(client, source, store, state, config.full_rescan)
        offset = state.clock_offset(source.system_key)
        change = run.change
        context.log.info(
            f"{source.system} {source.obj}: {run.pages} page(s) read since "
            f"{run.since.isoformat() if run.since else 'the beginning'}: {change.fetched} "
            f"record(s), {change.new} new, {change.changed} changed, {change.deleted} deleted"
        )
        return dg.MaterializeResult(
            check_results=[
                dg.AssetCheckResult(
                    check_name="no_future_dated_records",
                    passed=run.future_dated == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"future_dated": run.future_dated},
                ),
                dg.AssetCheckResult(
                    check_name="clock_in_step",
                    passed=abs(offset) <= CLOCK_WARN_SECONDS,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"clock_offset_seconds": round(offset, 3)},
                ),
            ],
            metadata={
                "future_dated": run.future_dated,
                "clock_offset_seconds": round(offset, 3),
                "dagster/row_count": run.rows,
                "live_records": run.live,
                "fetched": change.fetched,
                "new": change.new,
                "changed": change.changed,
                "deleted": change.deleted,
                "pages": run.pages,
                "mode": "full rescan" if config.full_rescan else "incremental",
                "read_since": run.since.isoformat() if run.since else "beginning",
                "cursor": run.cursor.isoformat() if run.cursor else "none",
                "path": dg.MetadataValue.path(store.uri(source.system_key, source.obj)),
            },
        )

    return snapshot


def sources_of(mappings: Sequence[FlowMapping]) -> list[SourceObject]:
    """The source objects the flows read, each once, in flow order."""
    found: list[SourceObject] = []
    for m in mappings:
        for obj in (m.a, m.b):
            if obj not in found:
                found.append(obj)
    return found


def build_snapshot_assets(mappings: Sequence[FlowMapping]) -> list[dg.AssetsDefinition]:
    return [build_snapshot_asset(source) for source in sources_of(mappings)]
