"""Writing: one flow's plan applied to one side through that side's connector.

The writer names no CRM: how a CRM takes writes (batches or single calls,
partial update or full replace, idempotent creates) is its client's business
behind the connector protocol. Base values and the audit log change only for
what a CRM confirmed; every per-record failure goes to the dead-letter table
and is retried by the next plan.

Both sides are written at the same time (:func:`write_flow`): links,
tombstones and bases that need no write are settled first; a pair written on
both sides gets its base once both CRMs confirmed it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from crm_assets.connector import Create, CrmClient, Outcome, Update
from crm_assets.engine.mapping import FlowMapping, canonical_text, map_side, to_side
from crm_assets.engine.reconcile import Plan, other, same_value
from crm_assets.engine.snapshot import SnapshotStore, flatten, records_to_frame
from crm_assets.engine.state import SyncState
from crm_assets.http import CrmError, CrmNotFound, CrmUnavailable, CrmValidationError
from crm_assets.sync.planning import WRITE_ORDER

#: Records written per step of progress (a log line after each step).
PROGRESS_STEP = 1000


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


class WriteStopped(Exception):
    """The run was interrupted while writing: what was confirmed so far is kept."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class FlowWriter:
    """Applies one flow's plan to one side through that side's client."""

    def __init__(
        self,
        mapping: FlowMapping,
        plan: Plan,
        state: SyncState,
        store: SnapshotStore,
        client: CrmClient,
        side: str,
        run_id: str,
        refs: Mapping[str, pl.DataFrame],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.mapping, self.plan, self.state, self.store = mapping, plan, state, store
        self.client, self.side, self.run_id, self.refs = client, side, run_id, refs
        self.progress = progress
        self.obj = mapping.side(side)
        self.first = side == WRITE_ORDER[0]
        self.result = WriteResult(side=side)
        self.cols = mapping.names
        self.fields = [c.a_field if side == "a" else c.b_field for c in mapping.columns]
        #: conflicts found after a 412: an edit made during the run beat a planned value
        self.late_conflicts: list[dict[str, Any]] = []
        #: (record id, modification time) of every write the CRM confirmed
        self.stamped: list[tuple[str, str]] = []
        #: set when the run is interrupted (terminated from the UI): stop before the next step
        self.stop = threading.Event()

    # -- steps (driven by :func:`write_flow`) ---------------------------------------------
    def skip_reason(self) -> str | None:
        """Why this plan writes nothing to any CRM (None: it writes)."""
        plan = self.plan
        if plan.rebuild_links:
            return "rebuilding links: nothing written or created"
        if plan.read_only:
            return "flow is read_only: plan only"
        return plan.blocked

    def write(self) -> set[str]:
        """Apply this side's part of the plan; returns the pair keys (``a_id``) whose write
        to this side the CRM confirmed (or that needed none)."""
        plan, flow = self.plan, self.mapping.name
        pairs = plan.pairs.filter(pl.col(f"write_{self.side}"))
        confirmed = self._updates(pairs)
        if self.late_conflicts:
            self.state.record_audit(self.run_id, flow, self.late_conflicts)
        # pairs written on this side only are settled now; those written on both sides
        # once both CRMs confirmed them (write_flow)
        self.finalize_bases(
            pairs.filter(
                pl.col("a_id").is_in(list(confirmed)) & ~pl.col(f"write_{other(self.side)}")
            )
        )
        self._creates(plan.creates[self.side])
        self._deletes(plan.deletes[self.side])
        self.result.deferred += plan.deferred.filter(pl.col("side") == self.side).height
        self.result.unchanged = plan.pairs.filter(~pl.col(f"write_{self.side}")).height
        self.result.conflicts = plan.conflicts.height if self.first else 0
        # records of the other side that could not be read as their object says
        source = other(self.side)
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
        self.state.record_own_writes(self.obj.system_key, self.obj.obj, self.stamped)
        return confirmed

    def save_new_links(self) -> None:
        """Links rebuilt from the CRMs, with no base: the next plan merges them as new."""
        new = self.plan.pairs.filter(pl.col("new_link")).select("a_id", "b_id")
        self.state.save_links(
            self.mapping.name,
            [(a, b, None) for a, b in new.iter_rows()],
            self.run_id,
            columns=self.mapping.dtypes,
        )
        self.result.linked = new.height

    def settle_links(self) -> None:
        """Tombstones, new links and bases that need no write (done once, by the first side)."""
        plan, flow = self.plan, self.mapping.name
        self.result.tombstoned = self.state.tombstone(
            flow, plan.tombstones.select("a_id", "b_id", "deleted_side").iter_rows(), self.run_id
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
        self.state.save_links(flow, rows, self.run_id, columns=self.mapping.dtypes)
        self._settle_dead_letters(no_write)
        # a record linked now needs no create: a create whose answer was lost (and whose
        # record the lookup found) leaves no dead letter behind
        new = plan.pairs.filter(pl.col("new_link"))
        self.state.resolve_dead_letters(flow, "b", [f"a:{i}" for i in new.get_column("a_id")])
        self.state.resolve_dead_letters(flow, "a", [f"b:{i}" for i in new.get_column("b_id")])
        self.result.linked = new.height
        if plan.side_effects.height:
            # once per record and field: the clear stays in place run after run
            known = self.state.audited(flow, "kept_ref", plan.side_effects["a_id"].to_list())
            self.state.record_audit(
                self.run_id,
                flow,
                [
                    {
                        "kind": "kept_ref",
                        "side": other(r["side"]),
                        "a_id": r["a_id"],
                        "b_id": r["b_id"],
                        "field": r["field"],
                        "old_value": r["kept_value"],
                        "new_value": r["kept_value"],
                        "note": f"cleared in {self.mapping.side(r['side']).system} because the "
                        "record it referred to was deleted there; not propagated",
                    }
                    for r in plan.side_effects.iter_rows(named=True)
                    # a record created on side a has no a_id yet: the next plan flags it
                    if r["a_id"] is not None and (r["a_id"], r["field"]) not in known
                ],
            )
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
                        "note": "losing value kept here; the newer modification (or the "
                        f"priority system) won: {self.mapping.a.system} modified "
                        f"{r['a_modified']}, {self.mapping.b.system} {r['b_modified']} "
                        "(sync host's clock, each CRM's clock offset taken off)",
                    }
                    for r in plan.conflicts.iter_rows(named=True)
                ],
            )

    def _with_base(self, pairs: pl.DataFrame) -> list[tuple[str, str, dict[str, Any]]]:
        finals = pairs.select("a_id", "b_id", *[pl.col(f"final.{c}").alias(c) for c in self.cols])
        return [(row.pop("a_id"), row.pop("b_id"), row) for row in finals.iter_rows(named=True)]

    def finalize_bases(self, done: pl.DataFrame) -> None:
        """base := final for pairs whose every planned write is confirmed."""
        self.state.save_links(
            self.mapping.name, self._with_base(done), self.run_id, columns=self.mapping.dtypes
        )
        self._settle_dead_letters(done)

    def _settle_dead_letters(self, pairs: pl.DataFrame) -> None:
        """Pairs settled as planned (or tombstoned) have no write outstanding: an earlier
        failure of one of their records (e.g. an update a newer edit made moot) is done."""
        for side in ("a", "b"):
            self.state.resolve_dead_letters(
                self.mapping.name, side, pairs.get_column(f"{side}_id").to_list()
            )

    # -- updates ---------------------------------------------------------------------------------
    def _updates(self, pairs: pl.DataFrame) -> set[str]:
        if not pairs.height:
            return set()
        finals = pairs.select(
            "a_id",
            "b_id",
            f"{self.side}_version",
            *[pl.col(f"final.{c}").alias(f"fin.{c}") for c in self.cols],
            *[pl.col(f"final.{c}").alias(c) for c in self.cols],
        )
        values = to_side(finals, self.mapping, self.side, self.refs)
        for row in values.filter(pl.col("error").is_not_null()).iter_rows(named=True):
            self.result.failures.append((row[f"{self.side}_id"], "update", row["error"]))
        # a reference not linked yet waits; the record's other fields are written now
        # (its base stays as it was, so the next runs finish the write)
        self.result.deferred += values.filter(
            pl.col("error").is_null() & pl.col("unresolved")
        ).height
        current = pairs.select(
            "a_id", *[pl.col(f"{self.side}.{c}").alias(f"cur.{c}") for c in self.cols]
        )
        keys = self.mapping.key_columns
        good = (
            values.filter(pl.col("error").is_null())
            .join(current, on="a_id", how="left")
            .with_columns(  # two spellings of one merge key are one value: never rewritten
                (~same_value(c, keys)(pl.col(f"fin.{c}"), pl.col(f"cur.{c}"))).alias(f"chg.{c}")
                for c in self.cols
            )
        )
        rows = list(good.iter_rows(named=True))
        # a record whose only change is a reference still waiting is not written at all
        # (a no-op write would look like a change to the sensors, run after run)
        jobs = [r for r in rows if self._changes(r)]
        confirmed = {r["a_id"] for r in rows if not r["unresolved"] and not self._changes(r)}
        records = self._current_records([r[f"{self.side}_id"] for r in jobs])
        updates = [
            Update(
                id=r[f"{self.side}_id"],
                version=r[f"{self.side}_version"],
                changes=self._changes(r),
                current=records.get(r[f"{self.side}_id"], {}),
            )
            for r in jobs
        ]
        audit: list[dict[str, Any]] = []
        outcomes = self._in_steps("updated", updates, self.client.update_records)
        for row, outcome in zip(jobs, outcomes, strict=True):
            if outcome.status == "conflict":
                outcome = self._after_412(row)
            if not outcome.ok:
                self.result.failures.append((row[self._id], "update", outcome.message or "failed"))
                continue
            self._own(outcome)
            self.result.updated += 1
            audit += self._audit_rows(row, self._waiting_fields(row))
            if not row["unresolved"]:
                confirmed.add(row["a_id"])
        self.state.record_audit(self.run_id, self.mapping.name, audit)
        self.state.resolve_dead_letters(
            self.mapping.name, self.side, [r[self._id] for r in jobs if r["a_id"] in confirmed]
        )
        return confirmed

    def _in_steps(
        self,
        verb: str,
        items: Sequence[Any],
        call: Callable[..., Any],
        after_step: Callable[[int, list[Outcome]], None] | None = None,
    ) -> list[Outcome]:
        """``call`` over the items in steps of :data:`PROGRESS_STEP`, saying how far it got
        (count, rate, time left) after each step that took a while; ``after_step(start,
        outcomes)`` records a step's outcomes before the next step is sent."""
        outcomes: list[Outcome] = []
        started = last = time.monotonic()
        for start in range(0, len(items), PROGRESS_STEP):
            if self.stop.is_set():
                raise WriteStopped(f"{self.obj.system} {self.obj.obj}: stopped after {start}")
            step = call(self.obj.obj, items[start : start + PROGRESS_STEP])
            if after_step:
                after_step(start, step)
            outcomes += step
            now = time.monotonic()
            if self.progress and (len(items) > PROGRESS_STEP or now - last >= 5):
                done, last = len(outcomes), now
                rate = done / max(now - started, 1e-9)
                left = (len(items) - done) / rate
                self.progress(
                    f"{self.obj.system} {self.obj.obj}: {done} of {len(items)} {verb} "
                    f"({rate:.0f}/s, about {left:.0f} s left)"
                )
        return outcomes

    def _own(self, outcome: Outcome) -> None:
        """Remember a confirmed write's version: the sensors will not take it for an edit."""
        if outcome.id is not None and outcome.stamp:
            self.stamped.append((outcome.id, outcome.stamp))

    @property
    def _id(self) -> str:
        return f"{self.side}_id"

    def _current_records(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The records as last read (flat), for a CRM that replaces whole records."""
        if not ids:
            return {}
        snapshot = self.store.read(self.obj.system_key, self.obj.obj)
        if snapshot is None:
            return {}
        id_field = self.obj.id_field
        rows = snapshot.join(pl.DataFrame({id_field: ids}), on=id_field)
        keep = [f for f in self.obj.fields if f not in self.obj.server_fields]
        return {r[id_field]: {f: r.get(f) for f in keep} for r in rows.iter_rows(named=True)}

    def _changes(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a write changes now (as this side holds them), waiting references aside."""
        waiting = self._waiting_fields(row)
        return {
            f: row[f]
            for c, f in zip(self.cols, self.fields, strict=True)
            if f not in waiting and row[f"chg.{c}"]
        }

    def _waiting_fields(self, row: Mapping[str, Any]) -> frozenset[str]:
        """This side's reference fields of a row whose reference is not linked yet."""
        if not row["unresolved"]:
            return frozenset()
        return frozenset(
            c.a_field if self.side == "a" else c.b_field
            for c in self.mapping.columns
            if c.reference
        )

    def _after_412(self, row: Mapping[str, Any]) -> Outcome:
        """The record changed since it was read: read it again, merge, and write what is left."""
        self.result.retried_412 += 1
        record_id = row[self._id]
        try:
            fresh = flatten(self.client.get(self.obj.obj, record_id))
        except CrmUnavailable:
            raise
        except CrmError as exc:
            return Outcome("failed", record_id, str(exc))
        needed = self._remerge(row, fresh)
        if needed is None:
            return Outcome("ok", record_id)
        version = fresh.get(self.obj.version_field)
        update = Update(record_id, None if version is None else str(version), needed, fresh)
        (outcome,) = self.client.update_records(self.obj.obj, [update])
        return outcome

    def _audit_rows(
        self, row: Mapping[str, Any], skip: frozenset[str] = frozenset()
    ) -> list[dict[str, Any]]:
        """One audit row per field the write changed (compared as canonical values)."""
        out = []
        for c, f in zip(self.cols, self.fields, strict=True):
            old, new = row.get(f"cur.{c}"), row.get(f"fin.{c}")
            if f not in skip and row[f"chg.{c}"]:
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
        frame = records_to_frame([dict(fresh)], obj.fields, obj.deleted_field)
        mapped = map_side(frame, self.mapping, self.side, self.refs)
        if not mapped.height:
            return None
        fresh_vals = mapped.row(0, named=True)
        out: dict[str, Any] = {}
        waiting = self._waiting_fields(row)
        for c, f in zip(self.cols, self.fields, strict=True):
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
            if c in self.mapping.key_columns and same_key(fresh_vals[c], row.get(f"fin.{c}")):
                continue  # one key spelled two ways: the record keeps its own spelling
            out[f] = row[f]
        needed = {f: v for f, v in out.items() if not _same(fresh.get(f), v)}
        return needed or None

    # -- creates ---------------------------------------------------------------------------------
    def _creates(self, creates: pl.DataFrame) -> None:
        if not creates.height:
            return
        source = other(self.side)
        values = to_side(self._without_gone_references(creates), self.mapping, self.side, self.refs)
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
        rows = list(good.iter_rows(named=True))

        def record(start: int, outcomes: list[Outcome]) -> None:
            """Link a step's creates at once: a run stopped or killed later keeps them."""
            done: list[tuple[str, str, str, dict[str, Any]]] = []
            for row, outcome in zip(rows[start : start + len(outcomes)], outcomes, strict=True):
                sid = row["source_id"]
                if outcome.ok and outcome.id is not None:
                    done.append((keys[sid], sid, outcome.id, canonical[sid]))
                    self._own(outcome)
                else:
                    # a lost answer leaves the intent pending: the next plan looks it up
                    self.result.failures.append(
                        (f"{source}:{sid}", "create", outcome.message or "")
                    )
            self.state.finish_creates(
                self.mapping.name, self.side, done, self.run_id, columns=self.mapping.dtypes
            )
            self.state.resolve_dead_letters(
                self.mapping.name, self.side, [f"{source}:{sid}" for _k, sid, _n, _v in done]
            )
            self.result.created += len(done)

        self._in_steps(
            "created",
            [Create(keys[r["source_id"]], {f: r[f] for f in self.fields}) for r in rows],
            self.client.create_records,
            record,
        )

    def _without_gone_references(self, creates: pl.DataFrame) -> pl.DataFrame:
        """Creates with the references cleared whose record was deleted on this side (the
        plan's side effects): the CRM would refuse them. The base keeps them."""
        source = other(self.side)
        effects = self.plan.side_effects.filter(
            (pl.col("side") == self.side) & pl.col(f"{self.side}_id").is_null()
        )
        for column in effects.get_column("field").unique().to_list():
            ids = effects.filter(pl.col("field") == column).get_column(f"{source}_id")
            creates = creates.with_columns(
                pl.when(pl.col("source_id").is_in(ids.implode()))
                .then(None)
                .otherwise(pl.col(column))
                .alias(column)
            )
        return creates

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


def write_flow(
    mapping: FlowMapping,
    plan: Plan,
    state: SyncState,
    store: SnapshotStore,
    clients: Mapping[str, CrmClient],
    run_id: str,
    refs: Mapping[str, pl.DataFrame],
    progress: Callable[[str], None] | None = None,
) -> dict[str, WriteResult]:
    """Apply one flow's plan to both of its CRMs at the same time.

    ``clients`` by connector key. Each CRM has a rate limit of its own, so one side's
    writes never wait for the other's (an initial sync written one side after the
    other spent CRMOffice's whole write time with Custom CRM idle). Links, tombstones
    and unwritten bases are settled first; a pair written on both sides gets its new
    base only after both CRMs confirmed it. A side that fails does not stop the other;
    its exception is raised once both are done.
    """
    said = threading.Lock()

    def say(message: str) -> None:
        with said:  # one line at a time from the two writing threads
            if progress:
                progress(message)

    writers = {
        side: FlowWriter(
            mapping,
            plan,
            state,
            store,
            clients[mapping.side(side).system_key],
            side,
            run_id,
            refs,
            say if progress else None,
        )
        for side in WRITE_ORDER
    }
    first = writers[WRITE_ORDER[0]]
    skipped = first.skip_reason()
    if skipped:
        if plan.rebuild_links:
            first.save_new_links()
        for writer in writers.values():
            writer.result.skipped = skipped
        return {side: writer.result for side, writer in writers.items()}
    first.settle_links()
    pool = ThreadPoolExecutor(len(writers), thread_name_prefix=f"write-{mapping.name}")
    try:
        running = {side: pool.submit(writer.write) for side, writer in writers.items()}
        wait(running.values())
    except BaseException:  # the run was interrupted: both sides stop at their next step
        for writer in writers.values():
            writer.stop.set()
        raise
    finally:
        pool.shutdown()
    confirmed = {side: future.result() for side, future in running.items()}
    both = confirmed["a"] & confirmed["b"]
    first.finalize_bases(
        plan.pairs.filter(pl.col("write_a") & pl.col("write_b") & pl.col("a_id").is_in(list(both)))
    )
    return {side: writer.result for side, writer in writers.items()}


def _audit_text(value: Any) -> str | None:
    """A canonical value as the audit log keeps it (as polars casts it to text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def same_key(x: Any, y: Any) -> bool:
    """Two merge-key values equal in canonical form (as :func:`canonical_key` compares)."""
    return canonical_text(x) == canonical_text(y)


def _same(x: Any, y: Any) -> bool:
    return x == y or (x in (None, "") and y in (None, ""))
