"""One sync run of one flow: plan from the snapshots and the state, then apply the plan.

This is where the engine meets the clients. Planning is whole-frame polars;
applying is per record at the edge (HTTP payloads): CRMOffice through its batch
endpoint, Custom CRM through concurrent single calls. Base values and the audit
log change only for what a CRM confirmed; every per-record failure goes to the
dead-letter table and is retried by the next plan.

Order of a run: the side-``b`` (CRMOffice) writes run first and settle links,
tombstones and bases that need no write; the side-``a`` (Custom CRM) writes
run second and settle the pairs that needed writes on both sides.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from crm_assets.crm_office.client import BATCH_SIZE, CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.checks import (
    CheckOutcome,
    disagreements,
    flow_checks,
    linked_pairs,
    unlinked,
)
from crm_assets.engine.document import DataflowDocument
from crm_assets.engine.mapping import FlowMapping, build_flow_mapping, map_side, to_side
from crm_assets.engine.reconcile import Plan, ReconcileOptions, reconcile_flow
from crm_assets.engine.snapshot import SnapshotStore, flatten, records_to_frame, schema
from crm_assets.engine.state import SyncState
from crm_assets.http import CrmConflict, CrmError, CrmNotFound, CrmUnavailable, CrmValidationError
from crm_assets.sources import SOURCES

log = logging.getLogger("crm_assets.sync")

#: Concurrent single calls to Custom CRM (its client's connection pool is as large).
CUSTOM_CRM_CONCURRENCY = 16


def flow_mappings(document: DataflowDocument) -> list[FlowMapping]:
    """The document's flows with supported objects, referenced flows first."""
    objects = {(s.system, s.entity): s for s in SOURCES}
    mappings = {}
    for flow in document.flows:
        if (flow.source.system, flow.source.entity) in objects and (
            flow.target.system,
            flow.target.entity,
        ) in objects:
            mappings[flow.name] = build_flow_mapping(document, flow, objects)
    ordered: list[FlowMapping] = []

    def visit(m: FlowMapping) -> None:
        if m in ordered:
            return
        for ref in m.references:
            visit(mappings[ref])
        ordered.append(m)

    for m in mappings.values():
        visit(m)
    return ordered


def _snapshot(store: SnapshotStore, mapping: FlowMapping, side: str) -> pl.DataFrame:
    obj = mapping.side(side)
    frame = store.read(obj.system_key, obj.obj)
    return frame if frame is not None else pl.DataFrame(schema=schema(obj.fields))


def reference_links(state: SyncState, mapping: FlowMapping) -> dict[str, pl.DataFrame]:
    """Per referenced flow, the ``a_id, b_id`` pairs references translate through.

    Tombstoned links count too: a tombstoned link still says which record stood for
    which, so a contact of a deleted product keeps its reference on both sides and
    the rest of it keeps syncing (with live links only it would wait forever).
    """
    return {ref: state.links(ref, {}).select("a_id", "b_id") for ref in mapping.references}


def map_flow(
    mapping: FlowMapping, store: SnapshotStore, state: SyncState
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both sides of a flow as canonical frames (references translated through the state)."""
    refs = reference_links(state, mapping)
    a = map_side(_snapshot(store, mapping, "a"), mapping, "a", refs)
    b = map_side(_snapshot(store, mapping, "b"), mapping, "b", refs)
    return a, b


def plan_flow(
    mapping: FlowMapping,
    a: pl.DataFrame,
    b: pl.DataFrame,
    state: SyncState,
    options: ReconcileOptions | None = None,
) -> Plan:
    """The plan of one flow from its mapped frames and the state database."""
    options = options or ReconcileOptions()
    enabled_at = state.enabled_at(mapping.name)
    if options.mode == "limited" and options.enabled_at is None:
        options = replace(options, enabled_at=enabled_at)
    links = state.links(mapping.name, {c.name: c.dtype for c in mapping.columns})
    pending = state.pending_creates(mapping.name)
    return reconcile_flow(mapping, a, b, links, options, pending)


# -- plans on disk: the reconciled asset writes them, the writes assets read them ---------------
_PLAN_PARTS = ("pairs", "conflicts", "ambiguous", "tombstones", "deferred", "failed")


def save_plan(plan: Plan, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in _PLAN_PARTS:
        getattr(plan, part).write_parquet(folder / f"{part}.parquet")
    for side in ("a", "b"):
        plan.creates[side].write_parquet(folder / f"creates_{side}.parquet")
        plan.deletes[side].write_parquet(folder / f"deletes_{side}.parquet")
    meta = {"flow": plan.flow, "blocked": plan.blocked, "read_only": plan.read_only}
    pl.DataFrame([{**meta, "columns": plan.columns, "counts": [plan.counts]}]).write_parquet(
        folder / "plan.parquet"
    )


def load_plan(folder: Path) -> Plan:
    if not (folder / "plan.parquet").exists():
        raise FileNotFoundError(f"no plan in {folder}: materialize the reconciled asset first")
    meta = pl.read_parquet(folder / "plan.parquet").row(0, named=True)
    parts = {part: pl.read_parquet(folder / f"{part}.parquet") for part in _PLAN_PARTS}
    return Plan(
        flow=meta["flow"],
        columns=list(meta["columns"]),
        creates={s: pl.read_parquet(folder / f"creates_{s}.parquet") for s in ("a", "b")},
        deletes={s: pl.read_parquet(folder / f"deletes_{s}.parquet") for s in ("a", "b")},
        counts=dict(meta["counts"][0]),
        blocked=meta["blocked"],
        read_only=meta["read_only"],
        **parts,
    )


# -- applying a plan ---------------------------------------------------------------------------
@dataclass
class WriteResult:
    """What one direction of one flow did."""

    side: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    conflicts: int = 0
    deferred: int = 0
    failed: int = 0
    linked: int = 0
    tombstoned: int = 0
    retried_412: int = 0
    skipped: str | None = None
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # id, action, message

    def counts(self) -> dict[str, int]:
        return {
            k: v for k, v in self.__dict__.items() if isinstance(v, int) and not isinstance(v, bool)
        }


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys back to nested objects; an object whose values are all null is null."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    for key, value in out.items():
        if isinstance(value, dict):
            nested = unflatten(value)
            out[key] = None if all(v is None for v in nested.values()) else nested
    return out


class FlowWriter:
    """Applies one flow's plan to one side through that side's client."""

    def __init__(
        self,
        mapping: FlowMapping,
        plan: Plan,
        state: SyncState,
        store: SnapshotStore,
        client: CustomCrmClient | CrmOfficeClient,
        side: str,
        run_id: str,
    ) -> None:
        self.mapping, self.plan, self.state, self.store = mapping, plan, state, store
        self.client, self.side, self.run_id = client, side, run_id
        self.obj = mapping.side(side)
        self.result = WriteResult(side=side)
        self.refs = reference_links(state, mapping)
        self.cols = mapping.names
        #: conflicts found after a 412: an edit made during the run beat a planned value
        self.late_conflicts: list[dict[str, Any]] = []

    # -- entry point --------------------------------------------------------------------------
    def run(self, confirmed_other: set[str] | None = None) -> tuple[WriteResult, set[str]]:
        """Apply this side's part of the plan; returns the result and the confirmed pair keys."""
        plan, flow = self.plan, self.mapping.name
        if plan.read_only:
            self.result.skipped = "flow is read_only: plan only"
            return self.result, set()
        if plan.blocked:
            self.result.skipped = plan.blocked
            return self.result, set()
        first = self.side == "b"
        if first:
            self._settle_links()
        pairs = plan.pairs.filter(pl.col(f"write_{self.side}"))
        confirmed = self._updates(pairs)
        if self.late_conflicts:
            self.state.record_audit(self.run_id, flow, self.late_conflicts)
        self._finalize_bases(confirmed, confirmed_other, first)
        self._creates(plan.creates[self.side])
        self._deletes(plan.deletes[self.side])
        self.result.deferred += plan.deferred.filter(pl.col("side") == self.side).height
        self.result.unchanged = plan.pairs.filter(~pl.col(f"write_{self.side}")).height
        self.result.conflicts = plan.conflicts.height if first else 0
        # records of the other side that could not be read as their object says
        source = "a" if self.side == "b" else "b"
        unreadable = plan.failed.filter(pl.col("side") == source)
        self.state.replace_dead_letters(
            flow,
            self.side,
            "read",
            [
                (f"{source}:{i}", reason)
                for i, reason in unreadable.select("id", "reason").iter_rows()
            ],
        )
        if self.result.failures:
            self.state.dead_letter(flow, [(self.side, i, a, m) for i, a, m in self.result.failures])
        self.result.failed = len(self.result.failures) + unreadable.height
        self.state.settle_intents(flow)
        return self.result, confirmed

    def _settle_links(self) -> None:
        """Tombstones, new links and bases that need no write (done once, by side b)."""
        plan, flow = self.plan, self.mapping.name
        self.result.tombstoned = self.state.tombstone(
            flow, plan.tombstones.select("a_id", "b_id").iter_rows(), self.run_id
        )
        # a tombstoned link has nothing left to write: its dead letters (e.g. an update that
        # met a record deleted before a full rescan noticed) would otherwise stay forever
        self._settle_dead_letters(plan.tombstones)
        no_write = plan.pairs.filter(~pl.col("write_a") & ~pl.col("write_b"))
        new_with_writes = plan.pairs.filter(
            pl.col("new_link") & (pl.col("write_a") | pl.col("write_b"))
        )
        rows = [(r[0], r[1], r[2]) for r in self._with_base(no_write)]
        rows += [(a, b, None) for a, b in new_with_writes.select("a_id", "b_id").iter_rows()]
        self.state.save_links(flow, rows, self.run_id)
        self._settle_dead_letters(no_write)
        # a record linked now needs no create: a create whose answer was lost (and whose
        # record the lookup found) leaves no dead letter behind
        new = plan.pairs.filter(pl.col("new_link"))
        self.state.resolve_dead_letters(flow, "b", [f"a:{i}" for i in new.get_column("a_id")])
        self.state.resolve_dead_letters(flow, "a", [f"b:{i}" for i in new.get_column("b_id")])
        self.result.linked = plan.pairs.filter(pl.col("new_link")).height
        if plan.conflicts.height:
            self.state.record_audit(
                self.run_id,
                flow,
                [
                    {
                        "kind": "conflict",
                        "side": r["winner"],
                        "a_id": r["a_id"],
                        "b_id": r["b_id"],
                        "field": r["field"],
                        "old_value": r["b_value"] if r["winner"] == "a" else r["a_value"],
                        "new_value": r["a_value"] if r["winner"] == "a" else r["b_value"],
                        "note": "losing value kept here; the newer modification (or the priority side) won",
                    }
                    for r in plan.conflicts.iter_rows(named=True)
                ],
            )

    def _with_base(self, pairs: pl.DataFrame) -> list[tuple[str, str, dict[str, Any]]]:
        finals = pairs.select("a_id", "b_id", *[pl.col(f"final.{c}").alias(c) for c in self.cols])
        return [(row.pop("a_id"), row.pop("b_id"), row) for row in finals.iter_rows(named=True)]

    def _finalize_bases(
        self, confirmed: set[str], confirmed_other: set[str] | None, first: bool
    ) -> None:
        """base := final for pairs whose every planned write is confirmed."""
        other = "a" if self.side == "b" else "b"
        pairs = self.plan.pairs.filter(pl.col("a_id").is_in(list(confirmed)))
        if first:
            done = pairs.filter(~pl.col(f"write_{other}"))
        else:
            other_ok = list(confirmed_other or set())
            done = pairs.filter(~pl.col(f"write_{other}") | pl.col("a_id").is_in(other_ok))
        self.state.save_links(self.mapping.name, self._with_base(done), self.run_id)
        self._settle_dead_letters(done)

    def _settle_dead_letters(self, pairs: pl.DataFrame) -> None:
        """Pairs settled as planned (or tombstoned) have no write outstanding: an earlier
        failure of one of their records (e.g. an update a newer edit made moot) is done."""
        for side in ("a", "b"):
            self.state.resolve_dead_letters(
                self.mapping.name, side, pairs.get_column(f"{side}_id").to_list()
            )

    # -- updates ---------------------------------------------------------------------------------
    def _side_values(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Final canonical values as this side's fields (+ error, unresolved)."""
        finals = frame.select(
            "a_id",
            "b_id",
            f"{self.side}_version",
            *[pl.col(f"final.{c}").alias(f"fin.{c}") for c in self.cols],
            *[pl.col(f"final.{c}").alias(c) for c in self.cols],
        )
        return to_side(finals, self.mapping, self.side, self.refs)

    def _updates(self, pairs: pl.DataFrame) -> set[str]:
        if not pairs.height:
            return set()
        values = self._side_values(pairs)
        bad = values.filter(pl.col("error").is_not_null())
        for row in bad.iter_rows(named=True):
            self.result.failures.append((row[f"{self.side}_id"], "update", row["error"]))
        # a reference not linked yet waits; the record's other fields are written now
        # (its base stays as it was, so the next runs finish the write)
        self.result.deferred += values.filter(
            pl.col("error").is_null() & pl.col("unresolved")
        ).height
        good = values.filter(pl.col("error").is_null())
        current = pairs.select(
            "a_id", *[pl.col(f"{self.side}.{c}").alias(f"cur.{c}") for c in self.cols]
        )
        good = good.join(current, on="a_id", how="left")
        if self.side == "b":
            return self._update_b(good)
        return self._update_a(good)

    def _fields(self) -> list[str]:
        return [c.a_field if self.side == "a" else c.b_field for c in self.mapping.columns]

    def _update_a(self, rows: pl.DataFrame) -> set[str]:
        client = self.client
        assert isinstance(client, CustomCrmClient)
        pairs = list(zip(self.cols, self._fields(), strict=True))
        jobs = list(rows.iter_rows(named=True))

        def one(row: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
            # a partial update of just the fields that change
            patch = {f: row[f] for c, f in pairs if not _same(row[f"fin.{c}"], row[f"cur.{c}"])}
            try:
                try:
                    updated = client.update(
                        self.obj.obj, row["a_id"], patch, _int(row["a_version"])
                    )
                except CrmConflict:
                    self.result.retried_412 += 1
                    fresh = client.get(self.obj.obj, row["a_id"])
                    retry = self._remerge(row, fresh)
                    if retry is None:
                        return row["a_id"], None, fresh
                    updated = client.update(
                        self.obj.obj, row["a_id"], retry, _int(fresh.get("Version"))
                    )
                return row["a_id"], None, updated
            except CrmUnavailable:
                raise
            except CrmError as exc:
                return row["a_id"], str(exc), None

        return self._collect(jobs, one)

    def _collect(self, jobs: list[dict[str, Any]], one: Any) -> set[str]:
        confirmed: set[str] = set()
        audit = []
        with ThreadPoolExecutor(max_workers=CUSTOM_CRM_CONCURRENCY) as pool:
            for row, (record_id, error, _record) in zip(jobs, pool.map(one, jobs), strict=True):
                if error:
                    self.result.failures.append((record_id, "update", error))
                    continue
                confirmed.add(row["a_id"])
                self.result.updated += 1
                audit += self._audit_rows(row)
        self.state.record_audit(self.run_id, self.mapping.name, audit)
        self.state.resolve_dead_letters(
            self.mapping.name, self.side, [self._rid(r) for r in jobs if r["a_id"] in confirmed]
        )
        return confirmed

    def _rid(self, row: Mapping[str, Any]) -> str:
        return row[f"{self.side}_id"]

    def _audit_rows(
        self, row: Mapping[str, Any], skip: frozenset[str] = frozenset()
    ) -> list[dict[str, Any]]:
        """One audit row per field the write changed (compared as canonical values)."""
        out = []
        for c, f in zip(self.cols, self._fields(), strict=True):
            old, new = row.get(f"cur.{c}"), row.get(f"fin.{c}")
            if f not in skip and not _same(old, new):
                out.append(
                    {
                        "kind": "update",
                        "side": self.side,
                        "a_id": row["a_id"],
                        "b_id": row["b_id"],
                        "field": f,
                        "old_value": None if old is None else str(old),
                        "new_value": None if new is None else str(new),
                    }
                )
        return out

    def _remerge(self, row: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any] | None:
        """After a 412: merge the freshly read record with the plan's final values again.

        The fresh record is this side's newest state; fields it changed since the
        plan keep its value (a newer edit), the rest take the planned value.
        Returns the write still needed, or None.
        """
        obj = self.obj
        frame = records_to_frame([fresh], obj.fields, obj.deleted_field)
        mapped = map_side(frame, self.mapping, self.side, self.refs)
        if not mapped.height:
            return None
        fresh_vals = mapped.row(0, named=True)
        out: dict[str, Any] = {}
        waiting = self._waiting_fields(row)
        for c, f in zip(self.cols, self._fields(), strict=True):
            if f in waiting:
                continue
            planned_old = row.get(f"cur.{c}")
            if not _same(fresh_vals[c], planned_old):
                # changed again on this side since the plan: the newer edit stays; if the
                # plan meant another value, that value lost a conflict: keep it in the audit
                planned = row.get(f"fin.{c}")
                if not _same(planned, planned_old) and not _same(planned, fresh_vals[c]):
                    self.late_conflicts.append(
                        {
                            "kind": "conflict",
                            "side": self.side,
                            "a_id": row["a_id"],
                            "b_id": row["b_id"],
                            "field": c,
                            "old_value": _audit_text(planned),
                            "new_value": _audit_text(fresh_vals[c]),
                            "note": "changed during the run (412): the newer edit won",
                        }
                    )
                continue
            out[f] = row[f]
        needed = {f: v for f, v in out.items() if not _same(fresh.get(f), v)}
        return needed or None

    def _update_b(self, rows: pl.DataFrame) -> set[str]:
        client = self.client
        assert isinstance(client, CrmOfficeClient)
        snapshot = self.store.read(self.obj.system_key, self.obj.obj)
        fields = self._fields()
        raw = (
            snapshot.join(
                rows.select(pl.col("b_id").alias(self.obj.id_field)), on=self.obj.id_field
            )
            if snapshot is not None
            else None
        )
        by_id = (
            {r[self.obj.id_field]: r for r in raw.iter_rows(named=True)} if raw is not None else {}
        )
        writable = [
            f for f in self.obj.fields if f not in ("id", "createdAt", "updatedAt", "rowVersion")
        ]
        confirmed: set[str] = set()
        # a record whose only change is a reference still waiting is not written at all
        # (a no-op write would look like a change to the sensors, run after run)
        jobs = [r for r in rows.iter_rows(named=True) if self._changes_now(r)]
        audit = []
        for start in range(0, len(jobs), BATCH_SIZE):
            chunk = jobs[start : start + BATCH_SIZE]
            items = []
            for row in chunk:
                record = {f: by_id.get(row["b_id"], {}).get(f) for f in writable}
                keep = self._waiting_fields(row)  # left as the record has them
                record.update({f: row[f] for f in fields if f not in keep})
                item = unflatten(record)
                item["id"] = row["b_id"]
                if row["b_version"] is not None:
                    item["rowVersion"] = row["b_version"]
                items.append(item)
            try:
                results = client.batch(self.obj.obj, update=items)
            except CrmUnavailable:
                raise
            except CrmError as exc:
                self.result.failures += [(r["b_id"], "update", str(exc)) for r in chunk]
                continue
            for row, item, res in zip(chunk, items, results, strict=True):
                status = res.get("status")
                if status in (200, 201):
                    ok = True
                elif status == 412:
                    ok = self._replace_after_412(row, item)
                else:
                    err = describe_item_error(res.get("error"))
                    self.result.failures.append((row["b_id"], "update", f"HTTP {status}: {err}"))
                    ok = False
                if ok:
                    self.result.updated += 1
                    audit += self._audit_rows(row, self._waiting_fields(row))
                    if not row["unresolved"]:
                        confirmed.add(row["a_id"])
        self.state.record_audit(self.run_id, self.mapping.name, audit)
        self.state.resolve_dead_letters(
            self.mapping.name, "b", [r["b_id"] for r in jobs if r["a_id"] in confirmed]
        )
        return confirmed

    def _changes_now(self, row: Mapping[str, Any]) -> bool:
        """Whether writing the row changes a field that is not waiting on a reference."""
        waiting = self._waiting_fields(row)
        return any(
            f not in waiting and not _same(row[f"fin.{c}"], row[f"cur.{c}"])
            for c, f in zip(self.cols, self._fields(), strict=True)
        )

    def _waiting_fields(self, row: Mapping[str, Any]) -> frozenset[str]:
        """This side's reference fields of a row whose reference is not linked yet."""
        if not row["unresolved"]:
            return frozenset()
        return frozenset(
            c.a_field if self.side == "a" else c.b_field
            for c in self.mapping.columns
            if c.reference
        )

    def _replace_after_412(self, row: Mapping[str, Any], item: dict[str, Any]) -> bool:
        client = self.client
        assert isinstance(client, CrmOfficeClient)
        self.result.retried_412 += 1
        try:
            fresh = client.get(self.obj.obj, row["b_id"])
            needed = self._remerge(row, flatten(fresh))
            if needed is None:
                return True
            record = flatten(fresh)
            record.update(needed)
            body = unflatten({k: v for k, v in record.items() if k in self.obj.fields})
            client.replace(self.obj.obj, row["b_id"], body, (fresh.get("rowVersion")))
            return True
        except CrmUnavailable:
            raise
        except CrmError as exc:
            self.result.failures.append((row["b_id"], "update", str(exc)))
            return False

    # -- creates ---------------------------------------------------------------------------------
    def _creates(self, creates: pl.DataFrame) -> None:
        if not creates.height:
            return
        source = "a" if self.side == "b" else "b"
        values = to_side(creates, self.mapping, self.side, self.refs)
        for row in values.filter(pl.col("error").is_not_null()).iter_rows(named=True):
            self.result.failures.append((f"{source}:{row['source_id']}", "create", row["error"]))
        self.result.deferred += values.filter(
            pl.col("error").is_null() & pl.col("unresolved")
        ).height
        good = values.filter(pl.col("error").is_null() & ~pl.col("unresolved"))
        if not good.height:
            return
        canon = creates.join(good.select("source_id"), on="source_id")
        canonical = {r.pop("source_id"): r for r in canon.iter_rows(named=True)}
        keys = self.state.begin_creates(
            self.mapping.name, self.side, good.get_column("source_id").to_list()
        )
        fields = self._fields()
        rows = list(good.iter_rows(named=True))
        done: list[tuple[str, str, str, dict[str, Any]]] = []
        if self.side == "b":
            done = self._create_b(rows, fields, keys, canonical)
        else:
            done = self._create_a(rows, fields, keys, canonical)
        self.state.finish_creates(self.mapping.name, self.side, done, self.run_id)
        self.state.resolve_dead_letters(
            self.mapping.name, self.side, [f"{source}:{sid}" for _k, sid, _n, _v in done]
        )
        self.result.created += len(done)

    def _create_b(
        self,
        rows: Sequence[dict[str, Any]],
        fields: list[str],
        keys: dict[str, str],
        canonical: dict[str, dict[str, Any]],
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        client = self.client
        assert isinstance(client, CrmOfficeClient)
        done = []
        for start in range(0, len(rows), BATCH_SIZE):
            chunk = rows[start : start + BATCH_SIZE]
            items = [unflatten({f: r[f] for f in fields}) for r in chunk]
            try:
                results = client.batch(self.obj.obj, create=items)
            except CrmUnavailable as exc:
                if not exc.maybe_applied:
                    raise  # unreachable: the run fails, nothing was created
                # the batch may have landed: the intents stay pending and the next
                # plan finds the records by their values before any retry
                self.result.failures += [(f"a:{r['source_id']}", "create", str(exc)) for r in chunk]
                continue
            except CrmError as exc:
                self.result.failures += [(f"a:{r['source_id']}", "create", str(exc)) for r in chunk]
                continue
            for row, res in zip(chunk, results, strict=True):
                item = res.get("item") if isinstance(res, dict) else None
                if (
                    res.get("status") in (200, 201)
                    and isinstance(item, dict)
                    and item.get("id") is not None
                ):
                    sid = row["source_id"]
                    done.append((keys[sid], sid, str(item["id"]), canonical[sid]))
                else:
                    self.result.failures.append(
                        (
                            f"a:{row['source_id']}",
                            "create",
                            f"HTTP {res.get('status')}: {describe_item_error(res.get('error'))}",
                        )
                    )
        return done

    def _create_a(
        self,
        rows: Sequence[dict[str, Any]],
        fields: list[str],
        keys: dict[str, str],
        canonical: dict[str, dict[str, Any]],
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        client = self.client
        assert isinstance(client, CustomCrmClient)

        def one(row: dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
            try:
                made = client.create(
                    self.obj.obj,
                    {f: row[f] for f in fields},
                    idempotency_key=keys[row["source_id"]],
                )
                return row, str(made["Id"]), None
            except CrmUnavailable:
                raise
            except CrmError as exc:
                return row, None, str(exc)

        done = []
        with ThreadPoolExecutor(max_workers=CUSTOM_CRM_CONCURRENCY) as pool:
            for row, new_id, error in pool.map(one, rows):
                sid = row["source_id"]
                if new_id is None:
                    self.result.failures.append((f"b:{sid}", "create", error or "no id"))
                else:
                    done.append((keys[sid], sid, new_id, canonical[sid]))
        return done

    # -- deletes (only when the flow propagates them) -------------------------------------------
    def _deletes(self, ids: pl.DataFrame) -> None:
        for record_id in ids.get_column("id").to_list():
            try:
                self.client.delete(self.obj.obj, record_id)
                self.result.deleted += 1
            except CrmNotFound:
                self.result.deleted += 1
            except CrmValidationError as exc:
                self.result.failures.append((record_id, "delete", str(exc)))
        if self.result.deleted:
            self.state.record_audit(
                self.run_id,
                self.mapping.name,
                [{"kind": "delete", "side": self.side, "note": f"{self.result.deleted} deleted"}],
            )


def describe_item_error(error: Any) -> str:
    """A batch item's error as one readable line: ``orgNr: must be 9 digits``."""
    if isinstance(error, dict):
        fields = error.get("errors")
        if isinstance(fields, list) and fields:
            return "; ".join(
                f"{e.get('field')}: {e.get('message')}" for e in fields if isinstance(e, dict)
            )
        return str(error.get("message") or error)
    return str(error)


def _audit_text(value: Any) -> str | None:
    """A canonical value as the audit log keeps it (as polars casts it to text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _same(x: Any, y: Any) -> bool:
    return x == y or (x in (None, "") and y in (None, ""))


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class FlowVerification:
    """What the two CRMs hold for one flow, checked after the writes."""

    flow: str
    linked: int
    disagreements: pl.DataFrame
    unlinked_a: pl.DataFrame
    unlinked_b: pl.DataFrame
    checks: list[CheckOutcome]


def verify_flow(mapping: FlowMapping, store: SnapshotStore, state: SyncState) -> FlowVerification:
    """The flow's QA checklist from snapshots taken after the writes.

    Ambiguous matches come from a read-only plan over the same data: what a
    sync would still find ambiguous now.
    """
    refs = reference_links(state, mapping)
    snaps = {side: _snapshot(store, mapping, side) for side in ("a", "b")}
    mapped = {side: map_side(snaps[side], mapping, side, refs) for side in ("a", "b")}
    links = state.links(mapping.name, {c.name: c.dtype for c in mapping.columns})
    plan = plan_flow(mapping, mapped["a"], mapped["b"], state, ReconcileOptions(mode="read_only"))
    checks = flow_checks(
        mapping, mapped, snaps, links, plan.ambiguous, state.dead_letters(mapping.name), refs
    )
    return FlowVerification(
        flow=mapping.name,
        linked=linked_pairs(mapped["a"], mapped["b"], links),
        disagreements=disagreements(mapping, mapped["a"], mapped["b"], links, refs).filter(
            ~pl.col("waiting")
        ),
        unlinked_a=unlinked(mapped["a"], links, "a"),
        unlinked_b=unlinked(mapped["b"], links, "b"),
        checks=checks,
    )


@dataclass
class FlowRun:
    """One flow's part of a :func:`sync_once` run."""

    plan: Plan
    results: dict[str, WriteResult]


def sync_once(
    mappings: Sequence[FlowMapping],
    clients: Mapping[str, CustomCrmClient | CrmOfficeClient],
    store: SnapshotStore,
    state: SyncState,
    options: ReconcileOptions | None = None,
    full_rescan: bool = False,
) -> dict[str, FlowRun]:
    """Everything one sync run does, without Dagster: the same steps as the asset graph.

    ``clients`` by system key (``custom_crm``, ``crm_office``); flows run in the
    order given (referenced flows first, as :func:`flow_mappings` orders them).
    """
    from crm_assets.sources import take_snapshot

    run_id = new_run_id()
    runs: dict[str, FlowRun] = {}
    snapshotted: set[tuple[str, str]] = set()
    for mapping in mappings:
        for obj in (mapping.a, mapping.b):
            if (obj.system_key, obj.obj) not in snapshotted:
                take_snapshot(clients[obj.system_key], obj, store, full_rescan=full_rescan)
                snapshotted.add((obj.system_key, obj.obj))
        a, b = map_flow(mapping, store, state)
        plan = plan_flow(mapping, a, b, state, options)
        results: dict[str, WriteResult] = {}
        confirmed: set[str] | None = None
        for side in ("b", "a"):  # CRMOffice first, then Custom CRM (see the module docstring)
            client = clients[mapping.side(side).system_key]
            writer = FlowWriter(mapping, plan, state, store, client, side, run_id)
            results[side], confirmed = writer.run(confirmed)
        runs[mapping.name] = FlowRun(plan, results)
    return runs
