"""Sensors that start the affected flows when a CRM changes, and the nightly full rescan."""

from datetime import datetime
from typing import Any

import dagster as dg

from crm_assets.changes import (
    Watermark,
    cursor_key,
    detect_changes,
    format_cursor,
    parse_cursor,
)
from crm_assets.connectors import with_fix
from crm_assets.defs.sync_assets import FLOW_TAG, flow_key
from crm_assets.engine.incremental import last_mark
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.objects import SourceObject
from crm_assets.http import CrmAuthError, CrmError, RetryPolicy
from crm_assets.settings import sensor_interval

#: A sensor tick must answer fast: an unreachable CRM skips the tick instead of hanging.
SENSOR_RETRY = RetryPolicy(attempts=2, initial=0.2, maximum=1.0, deadline=10)


def build_change_sensor(
    system_key: str, mappings: list[FlowMapping], jobs: dict[str, Any]
) -> dg.SensorDefinition:
    """Polls one CRM for records changed since its cursor; starts the flows that read them."""
    sources = []
    for m in mappings:
        for obj in (m.a, m.b):
            if obj.system_key == system_key and obj not in sources:
                sources.append(obj)
    system = sources[0].system
    #: objects several flows read (documents synced together): their edits go on through
    #: each flow, so a write of one flow starts the others (and the writer, to no effect)
    shared = [s for s in sources if sum(s in (m.a, m.b) for m in mappings) > 1]

    @dg.sensor(
        name=f"{system_key}_changes",
        description=f"Starts the flows whose {system} records changed since the last tick.",
        minimum_interval_seconds=sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=[jobs[f"sync_{m.name}"] for m in mappings],
        required_resource_keys={system_key, "storage"},
    )
    def changes(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        marks = parse_cursor(context.cursor)
        state = context.resources.storage.state()

        def own(source: SourceObject, stamped: list[tuple[str, str]]) -> set[str]:
            if source in shared:  # one flow's write is news to the others reading the object
                return set()
            pairs = [(record_id, moment) for moment, record_id in stamped]
            return state.own_writes(source.system_key, source.obj, pairs)

        try:
            with getattr(context.resources, system_key).client(retry=SENSOR_RETRY) as client:
                changed, new_marks = detect_changes(client, sources, marks, own)
        except CrmAuthError as exc:  # a failed tick (red), with the setting to fix
            raise dg.Failure(description=with_fix("credentials", str(exc))) from None
        except CrmError as exc:
            return dg.SkipReason(f"{system} is unreachable, cursor kept: {exc}")
        cursor = format_cursor(new_marks)
        if not changed:
            moved = any(
                m.position != marks.get(o, Watermark()).position for o, m in new_marks.items()
            )
            return dg.SensorResult(
                skip_reason=f"only the sync's own writes changed in {system}"
                if moved
                else f"no {system} record changed",
                cursor=cursor,  # the window of what this read saw moves on either way
            )
        objs = {(s.system_key, s.obj) for s in changed}
        flows = [
            m
            for m in mappings
            if {(m.a.system_key, m.a.obj), (m.b.system_key, m.b.obj)} & objs
            and not waiting_run(context.instance, m.name)
        ]
        if not flows:
            return dg.SensorResult(
                skip_reason=f"{system} changed; a run of each affected flow is queued or starting "
                "already",
                cursor=cursor,
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    job_name=f"sync_{m.name}",
                    run_key=f"{system_key}:{m.name}:{cursor_key(cursor)}",
                    tags={"crm_assets/trigger": f"{system_key} changed"},
                )
                for m in flows
            ],
            cursor=cursor,
        )

    return changes


def build_reference_sensor(
    mappings: list[FlowMapping], jobs: dict[str, Any]
) -> dg.SensorDefinition | None:
    """Starts a flow again when a flow it references linked records since its last plan.

    The sensors start each changed flow in a run of its own, side by side: a contact
    made together with its product is planned before the product's link exists and
    waits (deferred). The product flow's writes are the sync's own, which start no run,
    so without this the contact would wait for the next edit of anything or the nightly
    rescan. A new link also changes what references to that record map to.
    """
    referencing = [m for m in mappings if m.references]
    if not referencing:
        return None

    @dg.sensor(
        name="reference_followups",
        description="Starts a flow again when a flow it references linked records after "
        "its last plan (records waiting for that link sync then).",
        minimum_interval_seconds=sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=[jobs[f"sync_{m.name}"] for m in referencing],
        required_resource_keys={"storage"},
    )
    def followups(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        state = context.resources.storage.state()
        requests, reasons = [], []
        for m in referencing:
            mark = last_mark(state, m)
            if mark is None:  # never synced (or the document changed): the next run plans all
                continue
            since = datetime.fromisoformat(mark.at)
            linked = {ref: state.links_changed_since(ref, since).len() for ref in m.references}
            if not any(linked.values()) or waiting_run(context.instance, m.name):
                continue
            reasons.append(
                f"{m.name}: "
                + ", ".join(f"{n} link(s) of {ref}" for ref, n in linked.items() if n)
                + " made or changed after its last plan"
            )
            requests.append(
                dg.RunRequest(
                    job_name=f"sync_{m.name}",
                    run_key=f"references:{m.name}:{mark.at}",  # once per plan of the flow
                    tags={"crm_assets/trigger": reasons[-1]},
                )
            )
        if not requests:
            return dg.SkipReason("no referenced flow linked records after the last plans")
        context.log.info("; ".join(reasons))
        return dg.SensorResult(run_requests=requests)

    return followups


def waiting_run(instance: dg.DagsterInstance, flow: str) -> bool:
    """Whether a run of the flow is queued or still starting (no step begun): it will read
    this change too, so another run (say, the other CRM's sensor's) would only repeat it."""
    waiting = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
    ]
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=waiting, tags={FLOW_TAG: flow}))
    return bool(runs)


def full_sync_config(mappings: list[FlowMapping]) -> dict:
    """Run config reading every object anew and planning every record of every flow."""
    objs = {tuple(o.asset_path) for m in mappings for o in (m.a, m.b)}
    ops = {"__".join(o): {"config": {"full_rescan": True}} for o in sorted(objs)}
    for m in mappings:
        ops["__".join(flow_key(m, "reconciled").path)] = {"config": {"full_plan": True}}
    return {"ops": ops}


def build_nightly_rescan(mappings: list[FlowMapping], job: Any) -> dg.ScheduleDefinition:
    """Every night: re-read everything (finds hard deletes), then plan and sync every record."""
    return dg.ScheduleDefinition(
        name="nightly_full_rescan",
        cron_schedule="0 2 * * *",
        job=job,
        run_config=full_sync_config(mappings),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Full rescan of every object (finds hard deletes), then every flow.",
    )


def build_automation(
    mappings: list[FlowMapping], jobs: dict[str, Any]
) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    """One change sensor per CRM, the reference follow-ups, and the nightly rescan."""
    keys = sorted({o.system_key for m in mappings for o in (m.a, m.b)})
    sensors = [build_change_sensor(k, mappings, jobs) for k in keys]
    followups = build_reference_sensor(mappings, jobs)
    sensors += [followups] if followups else []
    return sensors, [build_nightly_rescan(mappings, jobs["sync_all"])]
